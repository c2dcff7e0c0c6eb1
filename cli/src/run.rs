//! `nvmm run`: boot a kernel with the console on this terminal.

use crate::args::RunArgs;
use crate::exit::{CliError, Outcome};
use crate::terminal::{self, RawTerminal};

/// Boots the kernel and serves it until it ends.
pub fn run(args: &RunArgs) -> Result<Outcome, CliError> {
    let config = args.vm_config();
    let vm = nvmm_vmm::build_and_boot(&config)?;
    terminal::stop_on_signals(vm.stop_handle()).map_err(CliError::Signals)?;
    let _raw = RawTerminal::enter().map_err(CliError::Terminal)?;
    // Lets tests prove the panic path restores the terminal; never set in normal use.
    if std::env::var_os("NVMM_TEST_PANIC_AFTER_BOOT").is_some() {
        panic!("panic injected by NVMM_TEST_PANIC_AFTER_BOOT");
    }
    let exit = vm.run_until_exit()?;
    Ok(Outcome::Vm(exit))
}
