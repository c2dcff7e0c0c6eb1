//! The Nix side of nvmm, checked with nix itself: every `.nix` file of the repository parses, the
//! guest module's pure helpers (nix/guest/lib.nix) write the runner description that
//! docs/runner.md specifies and refuse bad values, and the module states nvmm's version.
//!
//! These need `nix-instantiate` (scripts/test installs Debian's nix-bin) but no nixpkgs and no
//! network: lib.nix uses builtins only, and every evaluation runs against nix's `dummy://` store,
//! so nothing is built, fetched or written.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root: the workspace holds cli/, whose manifest dir this is.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

fn guest_lib() -> PathBuf {
    workspace_root().join("nix/guest/lib.nix")
}

/// `nix-instantiate` with the store and settings these tests need: no substituters (no network
/// to wait for) and a store that is never touched.
fn nix_instantiate() -> Command {
    let mut cmd = Command::new("nix-instantiate");
    cmd.env("NIX_CONFIG", "substituters =").args([
        "--extra-experimental-features",
        "nix-command flakes",
        "--store",
        "dummy://",
    ]);
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().unwrap_or_else(|err| {
        if err.kind() == io::ErrorKind::NotFound {
            panic!(
                "nix-instantiate is not installed; run scripts/test, which installs it \
                 (Debian package nix-bin)"
            )
        }
        panic!("cannot run nix-instantiate: {err}")
    })
}

/// Evaluates `body` with `lib` bound to nix/guest/lib.nix; the result as nix prints it in JSON,
/// or nix's error message.
fn eval_lib(body: &str) -> Result<String, String> {
    let mut cmd = nix_instantiate();
    cmd.args(["--eval", "--strict", "--json", "--argstr", "libPath"])
        .arg(guest_lib())
        .arg("--expr")
        .arg(format!(
            "{{ libPath }}: let lib = import libPath; in {body}"
        ));
    let out = run(cmd);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `lib.runnerJson runner` read back as JSON by nix: so the text is valid JSON, and nix prints
/// it with sorted keys and no spaces, which makes whole documents comparable.
fn runner_json(runner: &str) -> Result<String, String> {
    eval_lib(&format!("builtins.fromJSON (lib.runnerJson {runner})"))
}

/// Every `.nix` file below `dir`, skipping build output, git's own files and symlinks (a nix
/// build leaves `result` links into the store).
fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|err| panic!("read {dir:?}: {err}"));
    for entry in entries {
        let entry = entry.unwrap_or_else(|err| panic!("read {dir:?}: {err}"));
        let path = entry.path();
        let kind = entry
            .file_type()
            .unwrap_or_else(|err| panic!("stat {path:?}: {err}"));
        let name = entry.file_name();
        if kind.is_dir() {
            if name != "target" && name != ".git" {
                nix_files(&path, found);
            }
        } else if kind.is_file() && path.extension().is_some_and(|ext| ext == "nix") {
            found.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let root = workspace_root();
    let mut files = Vec::new();
    nix_files(&root, &mut files);
    for expected in [
        "flake.nix",
        "nix/guest/default.nix",
        "nix/guest/lib.nix",
        "templates/default/flake.nix",
    ] {
        assert!(
            files.contains(&root.join(expected)),
            "{expected} not found among {files:?}"
        );
    }
    let failures: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let mut cmd = nix_instantiate();
            cmd.arg("--parse").arg(file);
            let out = run(cmd);
            (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn runner_json_fills_in_the_documented_defaults() {
    assert_eq!(
        runner_json(r#"{ kernel = "kernel"; cmdline = "init=/nix/store/abc-system/init"; }"#),
        Ok(concat!(
            r#"{"cmdline":"init=/nix/store/abc-system/init","cmdlineNetwork":false,"#,
            r#""console":"virtio","diskSizeMiB":8192,"forwardPorts":[],"kernel":"kernel","#,
            r#""memoryMiB":1024,"vcpus":1,"version":1,"virtioDiscovery":"cmdline"}"#
        )
        .to_owned())
    );
}

#[test]
fn runner_json_keeps_every_member_it_is_given() {
    let runner = r#"{
        name = "server";
        kernel = "kernel";
        initrd = "initrd";
        cmdline = "console=hvc0 init=/nix/store/abc-system/init";
        storeImage = "store.erofs";
        memoryMiB = 2048;
        vcpus = 4;
        diskSizeMiB = 1024;
        forwardPorts = [
          { host = 8080; guest = 80; }
          { host = 2222; guest = 22; address = "0.0.0.0"; }
        ];
        console = "serial";
        virtioDiscovery = "both";
        cmdlineNetwork = true;
        moduleVersion = "0.1.0";
    }"#;
    assert_eq!(
        runner_json(runner),
        Ok(concat!(
            r#"{"cmdline":"console=hvc0 init=/nix/store/abc-system/init","cmdlineNetwork":true,"#,
            r#""console":"serial","diskSizeMiB":1024,"forwardPorts":["#,
            r#"{"address":"127.0.0.1","guest":80,"host":8080},"#,
            r#"{"address":"0.0.0.0","guest":22,"host":2222}],"#,
            r#""initrd":"initrd","kernel":"kernel","memoryMiB":2048,"moduleVersion":"0.1.0","#,
            r#""name":"server","storeImage":"store.erofs","vcpus":4,"version":1,"#,
            r#""virtioDiscovery":"both"}"#
        )
        .to_owned())
    );
}

#[test]
fn runner_json_refuses_bad_values_naming_the_member() {
    let base = r#"kernel = "kernel"; cmdline = "";"#;
    let cases = [
        (
            r#"console = "vga";"#,
            r#"`console` is "vga"; it must be one of "virtio", "serial""#,
        ),
        (
            "memoryMiB = 32;",
            "`memoryMiB` is 32; it must be at least 64",
        ),
        (
            r#"memoryMiB = "1G";"#,
            r#"`memoryMiB` must be an integer, not "1G""#,
        ),
        ("vcpus = 0;", "`vcpus` is 0; it must be at least 1"),
        ("vcpus = 255;", "`vcpus` is 255; it must be at most 254"),
        (
            "diskSizeMiB = 8;",
            "`diskSizeMiB` is 8; it must be at least 64",
        ),
        (
            r#"virtioDiscovery = "pci";"#,
            r#"`virtioDiscovery` is "pci"; it must be one of "cmdline", "acpi", "both""#,
        ),
        (
            r#"cmdlineNetwork = "yes";"#,
            r#"`cmdlineNetwork` must be true or false, not "yes""#,
        ),
        (
            r#"initrd = "";"#,
            r#"`initrd` must be a non-empty string, not """#,
        ),
        ("memory = 2048;", "nvmm.json has no member `memory`"),
        (
            "forwardPorts = [ { host = 0; guest = 80; } ];",
            "`forwardPorts[0].host` is 0; it must be at least 1",
        ),
        (
            "forwardPorts = [ { host = 80; guest = 80; } { host = 81; guest = 70000; } ];",
            "`forwardPorts[1].guest` is 70000; it must be at most 65535",
        ),
        (
            "forwardPorts = [ { host = 8080; } ];",
            "`forwardPorts[0]` needs both `host` and `guest`",
        ),
        (
            "forwardPorts = [ { host = 8080; guest = 80; proto = \"udp\"; } ];",
            "forwardPorts[0] has no member `proto`",
        ),
    ];
    for (member, message) in cases {
        let result = runner_json(&format!("{{ {base} {member} }}"));
        match result {
            Err(stderr) => assert!(
                stderr.contains(&format!("nvmm runner: {message}")),
                "{member}: expected {message:?} in {stderr}"
            ),
            Ok(json) => panic!("{member} was accepted: {json}"),
        }
    }
    for (runner, message) in [
        (r#"{ cmdline = ""; }"#, "`kernel` is required"),
        (r#"{ kernel = "kernel"; }"#, "`cmdline` is required"),
    ] {
        let stderr = runner_json(runner).expect_err(runner);
        assert!(
            stderr.contains(&format!("nvmm runner: {message}")),
            "{runner}: expected {message:?} in {stderr}"
        );
    }
}

#[test]
fn kernel_cmdline_puts_init_and_the_registration_after_the_configurations_parameters() {
    assert_eq!(
        eval_lib(
            r#"lib.kernelCmdline {
                toplevel = "/nix/store/abc-system";
                kernelParams = [ "console=hvc0" "loglevel=4" ];
                registration = "/nix/store/def-closure-info/registration";
            }"#
        ),
        Ok(concat!(
            r#""console=hvc0 loglevel=4 init=/nix/store/abc-system/init "#,
            r#"nvmm_reginfo=/nix/store/def-closure-info/registration""#
        )
        .to_owned())
    );
    assert_eq!(
        eval_lib(r#"lib.kernelCmdline { toplevel = "/nix/store/abc-system"; }"#),
        Ok(r#""init=/nix/store/abc-system/init""#.to_owned())
    );
}

#[test]
fn console_params_send_dev_console_where_typing_goes() {
    assert_eq!(
        eval_lib(r#"map lib.consoleParams [ "virtio" "serial" ]"#),
        Ok(r#"[["console=hvc0"],[]]"#.to_owned())
    );
    let stderr = eval_lib(r#"lib.consoleParams "vga""#).expect_err("vga is no console");
    assert!(
        stderr.contains("nvmm runner: `console` is \"vga\""),
        "{stderr}"
    );
}

#[test]
fn disks_are_found_by_the_serials_nvmm_gives_them() {
    assert_eq!(
        eval_lib("lib.disks"),
        Ok(concat!(
            r#"{"overlay":"/dev/disk/by-id/virtio-nvmm-overlay","#,
            r#""seed":"/dev/disk/by-id/virtio-nvmm-seed","#,
            r#""store":"/dev/disk/by-id/virtio-nvmm-store"}"#
        )
        .to_owned())
    );
}

#[test]
fn the_module_states_this_nvmm_version() {
    let path = workspace_root().join("nix/guest/version");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("read {path:?}: {err}"));
    // The module reads it with lib.fileContents, which drops one final newline.
    assert_eq!(
        text.strip_suffix('\n').unwrap_or(&text),
        env!("CARGO_PKG_VERSION")
    );
}
