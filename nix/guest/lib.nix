# The pure half of nvmm's guest module: builtins only, no nixpkgs, so that nvmm's test suite
# can evaluate it with a bare `nix-instantiate` (tests/nix_module.rs). default.nix takes its
# defaults, limits, device paths and the runner description from here, so the rules live once.
let
  inherit (builtins)
    attrNames
    concatStringsSep
    elem
    filter
    isAttrs
    isBool
    isInt
    isList
    isString
    length
    toJSON
    ;

  # One message shape for every bad value, naming the nvmm.json member (docs/runner.md).
  invalid = member: why: throw "nvmm runner: `${member}` ${why}";

  checkInt =
    member: lowest: highest: value:
    if !isInt value then
      invalid member "must be an integer, not ${toJSON value}"
    else if value < lowest then
      invalid member "is ${toString value}; it must be at least ${toString lowest}"
    else if highest != null && value > highest then
      invalid member "is ${toString value}; it must be at most ${toString highest}"
    else
      value;

  checkOneOf =
    member: allowed: value:
    if elem value allowed then
      value
    else
      invalid member "is ${toJSON value}; it must be one of ${concatStringsSep ", " (map toJSON allowed)}";

  checkString =
    member: value:
    if isString value && value != "" then
      value
    else
      invalid member "must be a non-empty string, not ${toJSON value}";

  # Members a caller may set that have no default: `null` leaves them out of nvmm.json.
  checkOptionalString = member: value: if value == null then null else checkString member value;

  # Rejecting what we do not know catches typos (`memory` for `memoryMiB`) here rather than
  # as a silently ignored member in nvmm.json.
  checkKnown =
    what: known: attrs:
    let
      unknown = filter (name: !(elem name known)) (attrNames attrs);
    in
    if unknown == [ ] then
      attrs
    else
      throw "nvmm runner: ${what} has no member `${concatStringsSep "`, `" unknown}`";

  checkForward =
    index: forward:
    let
      member = "forwardPorts[${toString index}]";
      known = [
        "host"
        "guest"
        "address"
      ];
    in
    if !isAttrs forward then
      invalid member "must be an object with `host` and `guest`"
    else if !(forward ? host && forward ? guest) then
      invalid member "needs both `host` and `guest`"
    else
      let
        checked = checkKnown member known forward;
      in
      {
        host = checkInt "${member}.host" 1 65535 checked.host;
        guest = checkInt "${member}.guest" 1 65535 checked.guest;
        address = checkString "${member}.address" (checked.address or defaults.forwardAddress);
      };

  checkForwards =
    forwards:
    if !isList forwards then
      invalid "forwardPorts" "must be a list"
    else
      builtins.genList (index: checkForward index (builtins.elemAt forwards index)) (length forwards);

  # Drops the optional members left unset, so nvmm.json states only what was chosen.
  withoutNulls =
    attrs:
    builtins.removeAttrs attrs (filter (name: attrs.${name} == null) (attrNames attrs));

  defaults = {
    memoryMiB = 1024;
    vcpus = 1;
    diskSizeMiB = 8192;
    console = "virtio";
    virtioDiscovery = "cmdline";
    cmdlineNetwork = false;
    forwardAddress = "127.0.0.1";
  };

  limits = {
    # Below this a NixOS system does not get through stage 2 (nvmm itself boots with less).
    minMemoryMiB = 64;
    # APIC IDs are 8 bits and 255 is the broadcast ID (vmm/src/kvm.rs MAX_VCPUS).
    maxVcpus = 254;
    # ext4's own metadata plus a journal; anything smaller fills up at the first write.
    minDiskSizeMiB = 64;
  };

  consoles = [
    "virtio"
    "serial"
  ];

  virtioDiscoveries = [
    "cmdline"
    "acpi"
    "both"
  ];

  # The serials nvmm gives its disks (docs/runner.md), as the guest's udev names them.
  disks = {
    store = "/dev/disk/by-id/virtio-nvmm-store";
    overlay = "/dev/disk/by-id/virtio-nvmm-overlay";
    seed = "/dev/disk/by-id/virtio-nvmm-seed";
  };

  # The kernel parameter that carries the store's Nix database registration to stage 2. It is
  # on the runner's command line, not in boot.kernelParams: the registration lists the
  # system's closure, so the system itself cannot name it.
  regInfoParam = "nvmm_reginfo";

  runnerMembers = [
    "name"
    "kernel"
    "initrd"
    "cmdline"
    "storeImage"
    "memoryMiB"
    "vcpus"
    "diskSizeMiB"
    "forwardPorts"
    "console"
    "virtioDiscovery"
    "cmdlineNetwork"
    "moduleVersion"
  ];
in
{
  inherit
    defaults
    limits
    consoles
    virtioDiscoveries
    disks
    regInfoParam
    ;

  # The text of nvmm.json (format version 1, docs/runner.md) for the members in `runner`:
  # defaults filled in, every value checked, a bad one a `throw` that names its member.
  # Paths stay as given: default.nix passes ones relative to the runner directory.
  runnerJson =
    runner:
    let
      r = checkKnown "nvmm.json" runnerMembers runner;
      cmdlineNetwork = r.cmdlineNetwork or defaults.cmdlineNetwork;
    in
    if !isAttrs runner then
      invalid "runner" "must be an attribute set"
    else if !(r ? kernel) then
      invalid "kernel" "is required"
    else if !(r ? cmdline) then
      invalid "cmdline" "is required"
    else if !isString r.cmdline then
      invalid "cmdline" "must be a string, not ${toJSON r.cmdline}"
    else if !isBool cmdlineNetwork then
      invalid "cmdlineNetwork" "must be true or false, not ${toJSON cmdlineNetwork}"
    else
      toJSON (withoutNulls {
        version = 1;
        name = checkOptionalString "name" (r.name or null);
        kernel = checkString "kernel" r.kernel;
        initrd = checkOptionalString "initrd" (r.initrd or null);
        inherit (r) cmdline;
        storeImage = checkOptionalString "storeImage" (r.storeImage or null);
        memoryMiB = checkInt "memoryMiB" limits.minMemoryMiB null (r.memoryMiB or defaults.memoryMiB);
        vcpus = checkInt "vcpus" 1 limits.maxVcpus (r.vcpus or defaults.vcpus);
        diskSizeMiB = checkInt "diskSizeMiB" limits.minDiskSizeMiB null (
          r.diskSizeMiB or defaults.diskSizeMiB
        );
        forwardPorts = checkForwards (r.forwardPorts or [ ]);
        console = checkOneOf "console" consoles (r.console or defaults.console);
        virtioDiscovery = checkOneOf "virtioDiscovery" virtioDiscoveries (
          r.virtioDiscovery or defaults.virtioDiscovery
        );
        inherit cmdlineNetwork;
        moduleVersion = checkOptionalString "moduleVersion" (r.moduleVersion or null);
      });

  # The runner's kernel command line (appended to nvmm's own): the configuration's parameters,
  # then the system's init and where stage 2 finds the store registration, last so that they
  # win over anything the parameters say.
  kernelCmdline =
    {
      toplevel,
      kernelParams ? [ ],
      registration ? null,
    }:
    concatStringsSep " " (
      kernelParams
      ++ [ "init=${toplevel}/init" ]
      ++ (if registration == null then [ ] else [ "${regInfoParam}=${registration}" ])
    );

  # Kernel parameters for `console`. nvmm always starts the command line with console=ttyS0;
  # the last console= becomes /dev/console, which gets systemd's status, the emergency shell and
  # stage 1's failure prompt, so it must be where typing goes.
  consoleParams =
    console:
    if checkOneOf "console" consoles console == "virtio" then [ "console=hvc0" ] else [ ];
}
