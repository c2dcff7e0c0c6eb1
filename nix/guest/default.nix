# nvmm's NixOS guest module. `nvmm boot NAME` adds it to nixosConfigurations.NAME with
# extendModules and builds config.system.build.nvmm, the runner directory that docs/runner.md
# describes; importing it by hand (the flake's nixosModules.default) does the same.
#
# How the guest boots. nvmm loads the configuration's own kernel and initrd directly (no boot
# loader) and attaches three virtio-blk disks, found by their serials:
#
#   nvmm-store    read-only erofs image of the system closure (system.build.nvmmStore),
#                 mounted at /nix/.ro-store;
#   nvmm-overlay  blank writable disk: stage 1 formats it ext4 and mounts it as /, and
#                 /nix/store is an overlay of the read-only store with an upper layer in
#                 /nix/.rw-store on it, so the guest can build and install;
#   nvmm-seed     a tar archive of per-boot data (name, address, hosts, ssh keys), which the
#                 nvmm-seed service applies early in stage 2.
#
# Stage 2 loads the store's registration into the guest's (fresh) Nix database, like
# qemu-vm.nix does, so that nix-store and nix-collect-garbage see the closure as valid.
#
# Everything here is in this directory: nvmm embeds the directory's files and writes them out
# to import them, so nothing may reach outside it.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  nvmmLib = import ./lib.nix;
  inherit (nvmmLib) disks;
  cfg = config.nvmm;
  toplevel = config.system.build.toplevel;

  # Integers with a lower bound only; the bounds themselves live in lib.nix.
  intAtLeast =
    lowest:
    lib.types.addCheck lib.types.int (n: n >= lowest)
    // {
      description = "integer of at least ${toString lowest}";
    };

  forwardPortOptions = {
    options = {
      host = lib.mkOption {
        type = lib.types.ints.between 1 65535;
        description = "Port on the host that nvmm listens on.";
      };
      guest = lib.mkOption {
        type = lib.types.ints.between 1 65535;
        description = "Port in the guest that connections go to.";
      };
      address = lib.mkOption {
        type = lib.types.str;
        default = nvmmLib.defaults.forwardAddress;
        description = "Host address to listen on.";
      };
    };
  };

  # The Nix database entries of the system closure, for `nix-store --load-db` in stage 2.
  regInfo = pkgs.closureInfo { rootPaths = [ toplevel ]; };

  # The store disk holds the registration too: stage 2 reads it from the guest's store.
  storeContents = pkgs.closureInfo {
    rootPaths = [
      toplevel
      regInfo
    ];
  };

  # The closure as an erofs image whose root directory is the store directory itself. tar
  # streams the store paths with the store prefix cut from their names (not from symlink
  # targets, which must stay absolute), and mkfs.erofs builds the image from that stream.
  # Owners and times are fixed, and so is the UUID, so that equal closures give equal images.
  storeImage =
    pkgs.runCommand "nvmm-store.erofs"
      {
        nativeBuildInputs = [ pkgs.buildPackages.erofs-utils ];
        # Built where the closure already is: a remote builder would first be sent all of it,
        # and no binary cache holds an image of this exact closure.
        preferLocalBuild = true;
        allowSubstitutes = false;
      }
      ''
        tar --create \
          --absolute-names \
          --verbatim-files-from \
          --files-from=${storeContents}/store-paths \
          --sort=name \
          --transform='flags=rSh;s|^${builtins.storeDir}/||' \
        | mkfs.erofs \
          --quiet \
          --tar=f \
          --force-uid=0 \
          --force-gid=0 \
          -T 0 \
          -U ccdf5243-d88f-4583-b34c-a3fd888f97ce \
          -L nix-store \
          $out
      '';

  runnerJson = nvmmLib.runnerJson {
    name = if config.networking.hostName == "" then null else config.networking.hostName;
    kernel = "kernel";
    initrd = "initrd";
    storeImage = "store.erofs";
    cmdline = nvmmLib.kernelCmdline {
      inherit toplevel;
      inherit (config.boot) kernelParams;
      registration = if config.nix.enable then "${regInfo}/registration" else null;
    };
    memoryMiB = cfg.memory;
    inherit (cfg) vcpus console;
    diskSizeMiB = cfg.diskSize;
    forwardPorts = map (forward: { inherit (forward) host guest address; }) cfg.forwardPorts;
    # NixOS kernels read virtio-mmio devices from the command line
    # (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, checked below); one way avoids a second probe.
    virtioDiscovery = "cmdline";
    moduleVersion = lib.fileContents ./version;
  };

  runner = pkgs.runCommandLocal "nvmm-runner-${config.system.name}" { } ''
    mkdir $out
    ln -s ${config.boot.kernelPackages.kernel}/${config.system.boot.loader.kernelFile} $out/kernel
    ln -s ${config.system.build.initialRamdisk}/${config.system.boot.loader.initrdFile} $out/initrd
    ln -s ${storeImage} $out/store.erofs
    cp ${pkgs.writeText "nvmm.json" runnerJson} $out/nvmm.json
  '';

  virtioConsole = cfg.console == "virtio";
  scriptedInitrd = !config.boot.initrd.systemd.enable;

  # Where the seed service unpacks the seed disk; 0700, since it holds a private key.
  seedDir = "/run/nvmm-seed";
  # sshd reads root's authorized keys here (AuthorizedKeysFile with %u), so the seed's key
  # opens root's account only and root's home is left alone.
  authorizedKeysDir = "/run/nvmm/authorized_keys.d";
  hostKey = "/etc/ssh/ssh_host_ed25519_key";
in
{
  # One identity for every copy of this module: a configuration that imports the flake's
  # nixosModules.default and is then booted by an nvmm that injects its own copy gets the module
  # once (the configuration's, whose moduleVersion nvmm checks against its own) rather than
  # every option declared twice.
  key = "nvmm-guest-module";

  options.nvmm = {
    memory = lib.mkOption {
      type = intAtLeast nvmmLib.limits.minMemoryMiB;
      default = nvmmLib.defaults.memoryMiB;
      description = "Guest memory in MiB. `nvmm boot --mem` overrides it for one boot.";
    };

    vcpus = lib.mkOption {
      type = lib.types.ints.between 1 nvmmLib.limits.maxVcpus;
      default = nvmmLib.defaults.vcpus;
      description = "Number of virtual CPUs. `nvmm boot --cpus` overrides it for one boot.";
    };

    diskSize = lib.mkOption {
      type = intAtLeast nvmmLib.limits.minDiskSizeMiB;
      default = nvmmLib.defaults.diskSizeMiB;
      description = ''
        Size in MiB of the writable disk that holds / and the store's upper layer. It is a
        sparse file on the host: it costs only what the guest writes.
      '';
    };

    forwardPorts = lib.mkOption {
      type = lib.types.listOf (lib.types.submodule forwardPortOptions);
      default = [ ];
      example = [
        {
          host = 8080;
          guest = 80;
        }
      ];
      description = "TCP ports forwarded from the host to the guest while it runs.";
    };

    console = lib.mkOption {
      type = lib.types.enum nvmmLib.consoles;
      default = nvmmLib.defaults.console;
      description = ''
        Where your typing goes: "virtio" is hvc0, which follows the size of your terminal;
        "serial" is the UART, ttyS0. The login prompt is there.
      '';
    };
  };

  config = lib.mkMerge [
    {
      # nvmm loads the kernel and initrd itself. mkDefault: a configuration that also boots
      # real hardware keeps its own loader settings.
      boot.loader.grub.enable = lib.mkDefault false;

      boot.initrd.availableKernelModules = [
        "virtio_mmio"
        "virtio_blk"
        "virtio_console"
        "virtio_net"
        "erofs"
        "overlay"
        "ext4"
      ];
      # virtio_mmio has no bus to be discovered on: it finds its devices in its own
      # virtio_mmio.device= parameters (which modprobe reads from the command line) when it is
      # loaded, so stage 1 loads it by name, and virtio_blk with it for the disks. hvc0 must
      # exist before the first message to /dev/console and before systemd's getty generator
      # looks for consoles.
      boot.initrd.kernelModules = [
        "virtio_mmio"
        "virtio_blk"
      ]
      ++ lib.optional virtioConsole "virtio_console";

      boot.kernelParams = nvmmLib.consoleParams cfg.console;

      # The configuration's own file systems belong to some other machine. mkOverride 10 is
      # qemu-vm.nix's mkVMOverride: above a configuration's mkForce.
      fileSystems."/" = lib.mkOverride 10 {
        device = disks.overlay;
        fsType = "ext4";
        # Formats the blank disk under systemd's stage 1 (x-systemd.makefs); the scripted
        # stage 1 ignores it, so postDeviceCommands below does the same job there.
        autoFormat = true;
      };
      fileSystems."/nix/.ro-store" = lib.mkOverride 10 {
        device = disks.store;
        fsType = "erofs";
        options = [ "ro" ];
        neededForBoot = true;
        # There is nothing to repair on a read-only image, and fsck.erofs is not in stage 1.
        noCheck = true;
      };
      fileSystems."/nix/store" = lib.mkOverride 10 {
        overlay = {
          lowerdir = [ "/nix/.ro-store" ];
          upperdir = "/nix/.rw-store/upper";
          workdir = "/nix/.rw-store/work";
        };
      };

      # Checked for kernels from outside nixpkgs, whose configuration NixOS cannot assume.
      system.requiredKernelConfig =
        let
          inherit (config.lib.kernelConfig) isEnabled isYes;
        in
        [
          (isEnabled "VIRTIO_MMIO")
          (isYes "VIRTIO_MMIO_CMDLINE_DEVICES")
          (isEnabled "VIRTIO_BLK")
          (isEnabled "VIRTIO_NET")
          (isEnabled "EROFS_FS")
          (isEnabled "OVERLAY_FS")
          (isEnabled "EXT4_FS")
          (if virtioConsole then isEnabled "VIRTIO_CONSOLE" else isYes "SERIAL_8250_CONSOLE")
        ];

      # The address comes from the seed disk; a DHCP client would only wait for a server
      # that is not there and then remove it. Priority 900: above the
      # `networking.useDHCP = lib.mkDefault true` that nixos-generate-config writes into
      # hardware-configuration.nix (two equal-priority values would not merge), below any
      # value a configuration sets plainly.
      networking.useDHCP = lib.mkOverride 900 false;
      networking.dhcpcd.enable = lib.mkDefault false;

      # `nvmm stop` asks for a clean shutdown by pressing Ctrl-Alt-Del on the i8042 keyboard
      # (as Firecracker does); systemd's default for it is a reboot, which nvmm would report as
      # the VM ending anyway, but a power-off says what happened.
      systemd.ctrlAltDelUnit = lib.mkDefault "poweroff.target";
      # The keyboard driver that sees the key press (built in on most kernels; harmless then).
      boot.kernelModules = [
        "i8042"
        "atkbd"
      ];

      # nvmm's console is a terminal on the host that only its user can reach.
      services.getty.autologinUser = lib.mkDefault "root";

      services.openssh = {
        enable = lib.mkDefault true;
        settings.PermitRootLogin = lib.mkDefault "prohibit-password";
        # Only the key the seed brings: the root disk is blank on every boot, so any other key
        # (NixOS also makes an RSA one) would be generated anew each time, slowly, and greet
        # `nvmm ssh` with a changed host key.
        hostKeys = lib.mkDefault [
          {
            type = "ed25519";
            path = hostKey;
          }
        ];
        authorizedKeysFiles = [ "${authorizedKeysDir}/%u" ];
      };

      systemd.services.nvmm-seed = {
        description = "Apply nvmm's per-boot settings from the seed disk";
        # Before sysinit.target, so every ordinary unit (sshd, the gettys, the network
        # scripts) starts with the name, address, hosts and keys in place.
        wantedBy = [ "sysinit.target" ];
        wants = [ "network-pre.target" ];
        before = [
          "sysinit.target"
          "network-pre.target"
          "sshd-keygen.service"
          "sshd.service"
          "sshd.socket"
          "shutdown.target"
        ];
        after = [
          "local-fs.target"
          "systemd-udev-trigger.service"
        ];
        conflicts = [ "shutdown.target" ];
        unitConfig.DefaultDependencies = false;
        restartIfChanged = false;
        path = [
          pkgs.gnutar
          pkgs.iproute2
        ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script = ''
          # udev names the disk (by-id) and the network interface while it replays the boot's
          # device events: wait for those rather than for the link itself, which a machine
          # booted without nvmm never gets.
          udevadm settle --timeout=30 || true
          if [ ! -e ${disks.seed} ]; then
            echo "no nvmm seed disk (${disks.seed}): nothing to apply"
            exit 0
          fi
          rm -rf ${seedDir}
          mkdir -m 0700 ${seedDir}
          tar --extract --file=${disks.seed} --directory=${seedDir} --no-same-owner
          cd ${seedDir}/nvmm

          if [ -s hostname ]; then
            # hostnamed is not running this early; the kernel's name is what everything reads.
            head -n 1 hostname | tr -d '\n' > /proc/sys/kernel/hostname
          fi

          if [ -s network ]; then
            field() { sed -n "s/^$1=//p" network | head -n 1; }
            mac=$(field MAC)
            address=$(field ADDRESS)
            gateway=$(field GATEWAY)
            iface=
            for link in /sys/class/net/*; do
              if [ "$(cat "$link/address")" = "''${mac,,}" ]; then
                iface=''${link##*/}
                break
              fi
            done
            if [ -z "$iface" ]; then
              echo "no network interface has MAC $mac: the network stays unconfigured" >&2
            else
              ip link set dev "$iface" up
              if [ -n "$address" ]; then
                ip address replace "$address" dev "$iface"
              fi
              if [ -n "$gateway" ]; then
                ip route replace default via "$gateway" dev "$iface"
              fi
            fi
          fi

          if [ -s hosts ]; then
            # NixOS's /etc/hosts is a link into the store: replace it with a file that has the
            # configuration's lines and then nvmm's. The markers let a kept root disk (--keep),
            # or a /etc/hosts that NixOS does not manage, take the new lines without
            # collecting the old ones.
            {
              if [ -e /etc/hosts ]; then
                sed '/^# BEGIN nvmm/,/^# END nvmm/d' /etc/hosts
              fi
              echo "# BEGIN nvmm: this network's VMs, written at boot from the seed disk"
              cat hosts
              echo "# END nvmm"
            } > /etc/.hosts.nvmm
            chmod 0644 /etc/.hosts.nvmm
            mv -f /etc/.hosts.nvmm /etc/hosts
          fi

          if [ -s ssh_host_ed25519_key ]; then
            install -D -m 0600 ssh_host_ed25519_key ${hostKey}
            if [ -s ssh_host_ed25519_key.pub ]; then
              install -m 0644 ssh_host_ed25519_key.pub ${hostKey}.pub
            fi
          fi

          if [ -s authorized_keys ]; then
            install -D -m 0644 authorized_keys ${authorizedKeysDir}/root
          fi
        '';
      };

      system.build.nvmmStore = storeImage;
      system.build.nvmm = runner;
    }

    # Both consoles print to the same terminal on the host, so a getty on each would show two
    # login prompts and answer typing on only one of them: keep the one where typing goes.
    # systemd's getty generator starts one on every kernel console (nvmm always passes
    # console=ttyS0); masking an instance stops that.
    (lib.mkIf virtioConsole {
      systemd.services."serial-getty@ttyS0".enable = false;
      systemd.targets.getty.wants = [ "serial-getty@hvc0.service" ];
    })
    (lib.mkIf (!virtioConsole) {
      systemd.services."serial-getty@hvc0".enable = false;
    })

    (lib.mkIf config.nix.enable {
      # The registration's path is on the command line: the system cannot name it itself,
      # since the registration lists the system.
      boot.postBootCommands = ''
        if [[ "$(cat /proc/cmdline)" =~ ${nvmmLib.regInfoParam}=([^ ]*) ]]; then
          ${config.nix.package.out}/bin/nix-store --load-db < "''${BASH_REMATCH[1]}"
        fi
      '';
    })

    # The scripted stage 1 has no x-systemd.makefs: format the blank root disk here, after udev
    # has made the by-id links and before stage 1 mounts the file systems.
    (lib.mkIf scriptedInitrd {
      boot.initrd.extraUtilsCommands = ''
        copy_bin_and_libs ${pkgs.e2fsprogs}/bin/mke2fs
      '';
      boot.initrd.postDeviceCommands = ''
        if waitDevice ${disks.overlay} \
          && [ -z "$(blkid -o value -s TYPE ${disks.overlay})" ] \
          && [ -z "$(blkid -o value -s PTTYPE ${disks.overlay})" ]; then
          echo "formatting ${disks.overlay} (ext4)..."
          # A blank nvmm disk reads as zeros, so the inode tables and journal need no zeroing.
          mke2fs -q -t ext4 -E lazy_itable_init=1,lazy_journal_init=1 ${disks.overlay}
        fi
      '';
    })
    (lib.mkIf (!scriptedInitrd) {
      # systemd-makefs runs mkfs.ext4 from the initrd's PATH.
      boot.initrd.systemd.initrdBin = [ pkgs.e2fsprogs ];
    })
  ];
}
