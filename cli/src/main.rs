//! `nvmm`: run NixOS configurations (and any Linux kernel) as local microVMs on KVM.

use std::process::ExitCode;

use clap::Parser;
use nvmm_cli::{args, commands, exit, logger, terminal};

fn main() -> ExitCode {
    let started = nvmm_vmm::mark_process_start();
    let cli = args::Cli::parse();
    logger::init(cli.verbosity(), started);
    terminal::install_panic_hook();
    let result = match cli.command {
        args::Command::Run(run) => commands::run(&run),
        args::Command::Boot(boot) => commands::boot(&boot),
        args::Command::List(list) => commands::list(&list),
        args::Command::Up(up) => commands::up(&up),
        args::Command::Ps(ps) => commands::ps(&ps),
        args::Command::Stop(stop) => commands::stop(&stop),
        args::Command::Down(down) => commands::down(&down),
        args::Command::Ssh(ssh) => commands::ssh(&ssh),
        args::Command::Completions(completions) => {
            use clap::CommandFactory;
            clap_complete::generate(
                completions.shell,
                &mut args::Cli::command(),
                "nvmm",
                &mut std::io::stdout(),
            );
            Ok(exit::Outcome::Done(true))
        }
        args::Command::Doctor(doctor) => commands::doctor(&doctor),
        args::Command::Console(vm) => commands::console(&vm.name),
        args::Command::Logs(logs) => commands::logs(&logs),
    };
    exit::report(result)
}
