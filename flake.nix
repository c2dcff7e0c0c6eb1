{
  description = "nvmm: run NixOS configurations as local microVMs on nvmm's own KVM-based VMM";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs =
    { self, nixpkgs }:
    let
      # nvmm drives x86-64 KVM only.
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      inherit (nixpkgs) lib;
      inherit ((lib.importTOML ./Cargo.toml).workspace.package) version;

      # Cargo's build output, which a checkout may hold: a flake from a git tree never has it,
      # but a path flake would copy it into every source.
      withoutBuildOutput =
        files:
        lib.fileset.difference files (
          lib.fileset.unions [
            (lib.fileset.maybeMissing ./target)
            (lib.fileset.maybeMissing ./tests/guest/target)
          ]
        );

      # nvmm's bare-metal test guest (tests/guest), which `nvmm doctor` boots. cli/build.rs
      # builds it with a nested cargo, which cannot fetch the guest's own dependencies inside
      # the build sandbox, so here it is a package of its own, handed to the main build.
      testGuest = pkgs.rustPlatform.buildRustPackage {
        pname = "nvmm-test-guest";
        inherit version;
        src = lib.fileset.toSource {
          root = ./tests/guest;
          fileset = withoutBuildOutput ./tests/guest;
        };
        cargoLock.lockFile = ./tests/guest/Cargo.lock;
        # The guest is linked for the bare machine by tests/guest/build.rs; the hardening
        # flags of the linker wrapper, patchelf and strip are all for Linux programs.
        hardeningDisable = [ "all" ];
        dontPatchELF = true;
        dontStrip = true;
        # No test harness without std.
        doCheck = false;
      };

      nvmm = pkgs.rustPlatform.buildRustPackage {
        pname = "nvmm";
        inherit version;
        src = lib.fileset.toSource {
          root = ./.;
          fileset = withoutBuildOutput (
            lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./cli
              ./devices
              ./vmm
              # cli/Cargo.toml names the integration tests there; build.rs embeds the module.
              ./tests
              ./nix/guest
            ]
          );
        };
        cargoLock.lockFile = ./Cargo.lock;
        env = {
          NVMM_TEST_GUEST_ELF_PREBUILT = "${testGuest}/bin/nvmm-test-guest";
          # `nvmm boot` imports this copy rather than writing out the one it embeds.
          NVMM_GUEST_MODULE = "${./nix/guest}";
        };
        # The tests boot VMs: they need /dev/kvm and root, which the build sandbox does not give.
        doCheck = false;
        meta = {
          description = "Run NixOS configurations as local microVMs";
          license = lib.licenses.asl20;
          mainProgram = "nvmm";
          platforms = [ system ];
        };
      };

      # The template's configurations as `nvmm boot` sees them: nvmm adds its module with
      # extendModules, as it does for any flake.
      template = (import ./templates/default/flake.nix).outputs {
        self = template;
        inherit nixpkgs;
      };
      withNvmm =
        name:
        (template.nixosConfigurations.${name}.extendModules {
          modules = [ self.nixosModules.default ];
        }).config;
      # Evaluating the derivations is the check (options, assertions, the module's own
      # throws); building them would build whole systems.
      evaluates =
        name:
        let
          config = withNvmm name;
        in
        pkgs.writeText "nvmm-template-${name}-evaluates" ''
          ${builtins.unsafeDiscardStringContext config.system.build.toplevel.drvPath}
          ${builtins.unsafeDiscardStringContext config.system.build.nvmm.drvPath}
        '';
    in
    {
      packages.${system} = {
        inherit nvmm;
        test-guest = testGuest;
        default = nvmm;
      };

      apps.${system}.default = {
        type = "app";
        program = lib.getExe nvmm;
        meta.description = nvmm.meta.description;
      };

      devShells.${system}.default = pkgs.mkShell {
        packages = [
          pkgs.cargo
          pkgs.rustc
          pkgs.clippy
          pkgs.rustfmt
          # Store images by hand (mkfs.erofs), as the guest module makes them.
          pkgs.erofs-utils
          # bench/: the `-M microvm` comparison; qemu_kvm is the host architecture only.
          pkgs.qemu_kvm
        ];
      };

      # An attribute set rather than the bare path, so that every flake checker accepts it; the
      # import keeps the file's name in error messages.
      nixosModules.default = {
        imports = [ ./nix/guest ];
      };

      templates.default = {
        path = ./templates/default;
        description = "Two NixOS microVMs for nvmm: a web server and a client";
      };

      checks.${system} = {
        package = nvmm;
        template-server = evaluates "server";
        template-client = evaluates "client";
      };
    };
}
