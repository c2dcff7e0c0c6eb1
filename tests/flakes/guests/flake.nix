# A stand-in for a flake of NixOS configurations, for the tests (no nixpkgs on the test hosts).
# Each `nixosConfigurations.NAME` has what nvmm uses of a real one: `extendModules`, and behind
# it `config.system.build.nvmm`, a runner directory (docs/runner.md) that boots nvmm's test
# guest. What each system does comes from settings.json, which the tests write beside this
# file (with guest.elf, the test guest) in a temporary copy.
{
  outputs = { self }:
    let
      settings = builtins.fromJSON (builtins.readFile ./settings.json);

      runner = name: system: derivation {
        name = "nvmm-runner-${name}";
        system = "x86_64-linux";
        # The Debian nix the tests use builds without a sandbox, so the host's sh and
        # coreutils are there.
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        guest = ./guest.elf;
        storeText = system.store or "";
        failBuild = system.failBuild or false;
        sleepBuild = system.sleepBuild or "";
        description = builtins.toJSON ({
          version = 1;
          inherit name;
          kernel = "kernel";
          cmdline = system.cmdline;
          storeImage = "store.img";
          memoryMiB = system.memoryMiB or 32;
          diskSizeMiB = 1;
          console = "serial";
          virtioDiscovery = "both";
          cmdlineNetwork = true;
          moduleVersion = "0.1.0";
        } // (system.extra or { }));
        args = [
          "-c"
          ''
            if [ -n "$sleepBuild" ]; then
              sleep "$sleepBuild"
            fi
            if [ "$failBuild" = 1 ]; then
              echo "this build fails on purpose"
              exit 7
            fi
            mkdir "$out"
            ln -s "$guest" "$out/kernel"
            printf '%s' "$description" > "$out/nvmm.json"
            printf '%s' "$storeText" > "$out/store.img"
            truncate -s 4096 "$out/store.img"
          ''
        ];
      };

      nixosSystem = name: system: {
        # A configuration that imports nvmm's module by hand declares `options.nvmm`; these
        # do not, so nvmm injects it.
        options = { };
        extendModules = { modules }:
          assert builtins.length modules == 1;
          assert builtins.pathExists (builtins.head modules)
            || throw "nvmm injected a module that does not exist: ${toString (builtins.head modules)}";
          if system ? evalError then throw system.evalError
          else { config.system.build.nvmm = runner name system; };
      };
    in
    if settings.noConfigurations or false then { }
    else { nixosConfigurations = builtins.mapAttrs nixosSystem settings.systems; };
}
