//! `nvmm`: run NixOS configurations (and any Linux kernel) as local microVMs on KVM.

mod args;
mod background;
mod boot;
mod control;
mod disks;
mod doctor;
mod exit;
mod fleet;
mod logger;
mod net;
mod nix;
mod run;
mod runner;
mod sandbox;
mod ssh;
mod state;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let started = nvmm_vmm::mark_process_start();
    let cli = args::Cli::parse();
    logger::init(cli.verbosity(), started);
    terminal::install_panic_hook();
    let result = match cli.command {
        args::Command::Run(run) => run::run(&run),
        args::Command::Boot(boot) => boot::boot(&boot),
        args::Command::List(list) => boot::list(&list),
        args::Command::Up(up) => fleet::up(&up),
        args::Command::Ps(ps) => fleet::ps(&ps),
        args::Command::Stop(stop) => fleet::stop(&stop),
        args::Command::Down(down) => fleet::down(&down),
        args::Command::Ssh(ssh) => fleet::ssh(&ssh),
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
        args::Command::Doctor(doctor) => doctor::doctor(&doctor),
        args::Command::Console(vm) => run::console(&vm.name),
        args::Command::Logs(logs) => run::logs(&logs),
    };
    exit::report(result)
}
