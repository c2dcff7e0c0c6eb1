//! nvmm's virtual machine monitor: turns a [`VmConfig`] into a running KVM guest.
//!
//! [`build_and_boot`] is the whole boot recipe, one step per line in machine order; the
//! resulting [`Vm`] runs its event loop on the calling thread until the guest powers off or
//! resets, the user quits, a signal arrives, or the guest fails. See `ARCHITECTURE.md`.

#![deny(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod coalesced;
pub mod config;
pub mod console;
pub mod console_server;
pub mod cpuid;
pub mod device_manager;
pub mod kvm;
pub mod layout;
pub mod privileges;
pub mod seccomp;
pub mod vcpu;

/// The device models nvmm is built from (re-exported for the CLI: errors it names, and taps it
/// creates for the VMM to open).
pub mod devices {
    pub use nvmm_devices::virtio::block::BlockError;
    pub use nvmm_devices::virtio::net::tap::Tap;
}

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{
    ConsoleBackend, ConsoleConfig, CpuidPolicy, DEFAULT_MEM_MIB, DiskConfig, NetConfig,
    VirtioDiscovery, VmConfig,
};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VmFd};
use nvmm_devices::lock;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::boot::BootError;
use crate::coalesced::{CoalescedWrites, ReplayTimer};
use crate::console::{ConsoleInput, ConsoleResize, RawStdout, ResizeHandle};
use crate::console_server::{ConsoleHub, ConsoleServer, HubWriter};
use crate::device_manager::{DeviceError, DeviceEvents};
use crate::kvm::KvmError;
use crate::seccomp::SeccompError;
use crate::vcpu::{GuestFault, Peripherals, Vcpu, VcpuError, VcpuOutcome};

/// Console size when stdin and stdout are not terminals.
pub const DEFAULT_CONSOLE_SIZE: (u16, u16) = (80, 24);

/// Smallest guest nvmm boots: the boot structures live below 1 MiB and a kernel above it.
pub const MIN_MEM_MIB: u64 = 8;

/// Everything that can stop a VM from being built or from running to a clean end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is impossible on this host.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM setup failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Loading the kernel or writing boot data failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Writing ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Attaching devices failed.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// A vCPU could not be set up or run.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The guest failed (triple fault, emulation failure, ...).
    #[error(transparent)]
    Guest(#[from] GuestFault),
    /// The console socket or log could not be set up.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// A seccomp filter could not be built.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The event loop failed.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
}

/// Invalid sizes in a [`VmConfig`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Too little memory.
    #[error("{0} MiB of memory is too little; nvmm needs at least {MIN_MEM_MIB} MiB")]
    MemoryTooSmall(u64),
    /// More memory than the host has.
    #[error("{requested} MiB of memory requested but this host has {host} MiB")]
    MemoryExceedsHost {
        /// Requested MiB.
        requested: u64,
        /// Host total MiB.
        host: u64,
    },
    /// Zero vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
}

/// Errors setting up a background VM's console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The console log could not be opened.
    #[error("cannot open the console log {}", .path.display())]
    Log {
        /// Log path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The console socket could not be created.
    #[error("cannot listen on the console socket {}", .path.display())]
    Listen {
        /// Socket path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The console socket could not be served.
    #[error("cannot serve the console socket")]
    Socket(#[source] std::io::Error),
}

/// Where console output goes, made before the devices that write to it.
enum ConsoleOutput {
    Terminal,
    Socket {
        hub: Arc<Mutex<ConsoleHub>>,
        listener: std::os::unix::net::UnixListener,
    },
}

impl ConsoleOutput {
    fn open(backend: &ConsoleBackend) -> Result<Self, ConsoleError> {
        match backend {
            ConsoleBackend::Terminal => Ok(Self::Terminal),
            ConsoleBackend::Socket {
                socket,
                log,
                log_limit,
            } => {
                let hub = ConsoleHub::new(log, *log_limit).map_err(|source| ConsoleError::Log {
                    path: log.clone(),
                    source,
                })?;
                // A socket file left by a VM that was killed; the caller made sure no VM of
                // this name runs.
                let _ = std::fs::remove_file(socket);
                let listener =
                    std::os::unix::net::UnixListener::bind(socket).map_err(|source| {
                        ConsoleError::Listen {
                            path: socket.clone(),
                            source,
                        }
                    })?;
                Ok(Self::Socket {
                    hub: Arc::new(Mutex::new(hub)),
                    listener,
                })
            }
        }
    }

    fn writer(&self) -> nvmm_devices::legacy::SerialWriter {
        match self {
            Self::Terminal => Box::new(RawStdout),
            Self::Socket { hub, .. } => Box::new(HubWriter(hub.clone())),
        }
    }
}

/// How a VM ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 or ACPI reset register).
    Reset,
    /// The user pressed the quit escape (`Ctrl-A x`).
    Quit,
    /// A signal (SIGTERM, SIGINT, SIGHUP) asked nvmm to stop.
    Signal(i32),
}

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records when the process started; call it first thing in `main`. Log timestamps and the
/// debug port's marker times count from here.
pub fn mark_process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// Checks the parts of a config that do not need KVM.
pub fn validate_config(config: &VmConfig) -> Result<(), ConfigError> {
    if config.mem_mib < MIN_MEM_MIB {
        return Err(ConfigError::MemoryTooSmall(config.mem_mib));
    }
    if let Some(host) = host_memory_mib() {
        if config.mem_mib > host {
            return Err(ConfigError::MemoryExceedsHost {
                requested: config.mem_mib,
                host,
            });
        }
    }
    if config.vcpus == 0 {
        return Err(ConfigError::NoVcpus);
    }
    Ok(())
}

fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Builds the VM described by `config` and starts its vCPUs. The guest is running when this
/// returns; call [`Vm::run_until_exit`] to serve its devices until it ends.
pub fn build_and_boot(config: &VmConfig) -> Result<Vm, Error> {
    let process_start = mark_process_start();
    validate_config(config)?;
    let mem_bytes = config.mem_mib << 20;

    let kvm = kvm::open_kvm()?;
    kvm::check_vcpu_count(&kvm, config.vcpus)?;
    let mem = kvm::create_guest_memory(config.mem_mib)?;
    let vm = kvm::create_vm(&kvm, &mem)?;
    let vcpu_fds = create_vcpus(&vm, config.vcpus)?;
    let console_output = ConsoleOutput::open(&config.console.backend)?;
    let mut devices =
        device_manager::attach_legacy_devices(&vm, console_output.writer(), process_start)?;
    device_manager::attach_disks(&vm, &mut devices, &mem, &config.disks)?;
    device_manager::attach_nets(&vm, &mut devices, &mem, &config.nets)?;
    // Set once the UART's data writes are coalesced (below).
    let serial_first = Arc::new(OnceLock::new());
    if config.console.virtio {
        let size = console::terminal_size().unwrap_or(DEFAULT_CONSOLE_SIZE);
        let output = Box::new(SerialFirst {
            output: console_output.writer(),
            serial: serial_first.clone(),
        });
        device_manager::attach_console(&vm, &mut devices, &mem, output, size)?;
    }
    let discovery = config.virtio_discovery;
    let cmdline_devices = if discovery.cmdline() {
        &devices.virtio[..]
    } else {
        &[]
    };
    let acpi_devices = if discovery.acpi() {
        &devices.virtio[..]
    } else {
        &[]
    };

    let kernel = boot::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&mem, &kernel, path, mem_bytes)?),
        None => None,
    };
    let cmdline = boot::build_cmdline(&kernel, cmdline_devices, &config.cmdline)?;
    let rsdp = acpi::write_acpi_tables(&mem, config.vcpus, acpi_devices)?;
    boot::write_long_mode_tables(&mem)?;
    let entry = boot::write_boot_params(&mem, &kernel, &cmdline, initrd, mem_bytes, rsdp)?;

    let peripherals = Peripherals {
        pio: Arc::new(devices.pio),
        mmio: Arc::new(devices.mmio),
    };
    let coalesced =
        coalesce_serial_output(&kvm, &vm, &vcpu_fds[0], &peripherals, &mut devices.events)?;
    if let Some(writes) = &coalesced {
        let _ = serial_first.set(writes.clone());
    }
    let vcpus = configure_vcpus(
        &kvm,
        vcpu_fds,
        &mem,
        &peripherals,
        coalesced.clone(),
        entry,
        config,
    )?;
    log::info!(
        "booting {} ({} MiB, {} vCPUs) with command line {:?}",
        config.kernel.display(),
        config.mem_mib,
        config.vcpus,
        cmdline.as_cstring().unwrap_or_default()
    );
    Vm::start(kvm, vm, mem, vcpus, devices.events, config, console_output)
}

/// The virtio console's output. Both consoles print to one terminal: the UART's queued writes
/// go out first, so that what the guest wrote to the UART before comes before.
struct SerialFirst {
    output: nvmm_devices::legacy::SerialWriter,
    serial: Arc<OnceLock<Arc<CoalescedWrites>>>,
}

impl std::io::Write for SerialFirst {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(writes) = self.serial.get() {
            writes.replay();
        }
        self.output.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.output.flush()
    }
}

/// Has KVM queue the UART's data writes (coalesced.rs), and the event loop replay them on its
/// timer; None where KVM cannot queue them.
fn coalesce_serial_output(
    kvm: &Kvm,
    vm: &VmFd,
    vcpu: &kvm_ioctls::VcpuFd,
    peripherals: &Peripherals,
    events: &mut DeviceEvents,
) -> Result<Option<Arc<CoalescedWrites>>, Error> {
    let Some(ring) = kvm::coalesced_serial_ring(kvm, vm, vcpu) else {
        return Ok(None);
    };
    let transmit_interrupt = lock(&events.serial).transmit_interrupt();
    let writes = CoalescedWrites::new(ring, peripherals.clone(), transmit_interrupt)
        .map_err(|e| Error::Devices(DeviceError::SerialTimer(e)))?;
    let writes = Arc::new(writes);
    let timer = ReplayTimer(writes.clone());
    events.subscribers.push(Arc::new(Mutex::new(timer)));
    Ok(Some(writes))
}

/// Gives every vCPU its CPUID, MSRs, FPU and LAPIC state, and the boot vCPU the kernel entry.
fn configure_vcpus(
    kvm: &Kvm,
    fds: Vec<kvm_ioctls::VcpuFd>,
    mem: &GuestMemoryMmap,
    peripherals: &Peripherals,
    coalesced: Option<Arc<CoalescedWrites>>,
    entry: boot::KernelEntry,
    config: &VmConfig,
) -> Result<Vec<Vcpu>, Error> {
    let supported_cpuid = kvm::supported_cpuid(kvm)?;
    let mut vcpus = Vec::with_capacity(fds.len());
    for (index, fd) in (0u8..).zip(fds) {
        let vcpu = Vcpu::new(
            fd,
            index,
            peripherals.clone(),
            coalesced.clone(),
            mem.clone(),
        );
        let cpuid = cpuid::vcpu_cpuid(&supported_cpuid, index, config.vcpus, config.cpuid);
        vcpu.configure(&cpuid)?;
        if index == 0 {
            vcpu.enter_kernel(entry)?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

fn create_vcpus(vm: &VmFd, count: u8) -> Result<Vec<kvm_ioctls::VcpuFd>, Error> {
    (0..count)
        .map(|index| {
            vm.create_vcpu(u64::from(index))
                .map_err(|source| VcpuError::Setup {
                    what: "create the vCPU",
                    vcpu: index,
                    source,
                })
                .map_err(Error::from)
        })
        .collect()
}

/// Stops a running VM from another thread or a signal handler.
#[derive(Clone, Debug)]
pub struct StopHandle {
    inner: Arc<StopState>,
}

#[derive(Debug)]
struct StopState {
    event: EventFd,
    signal: AtomicI32,
    quit: AtomicBool,
}

impl StopHandle {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(StopState {
                event: EventFd::new(libc::EFD_NONBLOCK)?,
                signal: AtomicI32::new(0),
                quit: AtomicBool::new(false),
            }),
        })
    }

    /// The user asked to quit.
    pub fn quit(&self) {
        self.inner.quit.store(true, Ordering::Release);
        self.wake();
    }

    /// A signal asked nvmm to stop. Async-signal-safe: one atomic store and one write(2).
    pub fn stop_for_signal(&self, signal: i32) {
        self.inner.signal.store(signal, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        // Only fails if the counter would overflow, and then it is already signalled.
        let _ = self.inner.event.write(1);
    }
}

/// Asks the guest to shut down: presses Ctrl-Alt-Del on its keyboard. A guest that ignores it
/// keeps running; [`StopHandle`] ends the VM regardless.
#[derive(Clone)]
pub struct ShutdownHandle {
    i8042: Arc<Mutex<nvmm_devices::legacy::I8042>>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle").finish_non_exhaustive()
    }
}

impl ShutdownHandle {
    /// Presses Ctrl-Alt-Del.
    pub fn request_shutdown(&self) {
        log::info!("asking the guest to shut down (Ctrl-Alt-Del)");
        lock(&self.i8042).press_ctrl_alt_del();
    }
}

const EXIT_POWEROFF: u32 = 0;
const EXIT_RESET: u32 = 1;
const EXIT_VCPU: u32 = 2;
const EXIT_STOP: u32 = 3;

/// Turns every way a VM can end into one outcome.
struct ExitMonitor {
    poweroff: EventFd,
    reset: EventFd,
    vcpu_exited: EventFd,
    vcpu_reports: Receiver<(u8, VcpuOutcome)>,
    stop: StopHandle,
    outcome: Option<Result<VmExit, Error>>,
}

impl ExitMonitor {
    fn finish(&mut self, outcome: Result<VmExit, Error>) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
    }

    fn drain_vcpu_reports(&mut self) {
        while let Ok((index, outcome)) = self.vcpu_reports.try_recv() {
            log::debug!("vCPU {index} stopped: {outcome:?}");
            match outcome {
                VcpuOutcome::Stopped => {}
                VcpuOutcome::PowerOff => self.finish(Ok(VmExit::PowerOff)),
                VcpuOutcome::Reset => self.finish(Ok(VmExit::Reset)),
                VcpuOutcome::Fault(fault) => self.finish(Err(fault.into())),
                VcpuOutcome::Error(err) => self.finish(Err(err.into())),
            }
        }
    }
}

impl MutEventSubscriber for ExitMonitor {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EXIT_POWEROFF => {
                let _ = self.poweroff.read();
                self.finish(Ok(VmExit::PowerOff));
            }
            EXIT_RESET => {
                let _ = self.reset.read();
                self.finish(Ok(VmExit::Reset));
            }
            EXIT_VCPU => {
                let _ = self.vcpu_exited.read();
                self.drain_vcpu_reports();
            }
            EXIT_STOP => {
                let _ = self.stop.inner.event.read();
                let signal = self.stop.inner.signal.load(Ordering::Acquire);
                if signal != 0 {
                    self.finish(Ok(VmExit::Signal(signal)));
                } else if self.stop.inner.quit.load(Ordering::Acquire) {
                    self.finish(Ok(VmExit::Quit));
                }
            }
            other => log::warn!("exit monitor: unexpected event data {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            (&self.poweroff, EXIT_POWEROFF),
            (&self.reset, EXIT_RESET),
            (&self.vcpu_exited, EXIT_VCPU),
            (&self.stop.inner.event, EXIT_STOP),
        ];
        let failed = sources
            .into_iter()
            .find_map(|(fd, data)| ops.add(Events::with_data(fd, data, EventSet::IN)).err());
        if let Some(err) = failed {
            self.finish(Err(Error::EventLoop(err)));
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A running VM.
pub struct Vm {
    event_manager: EventManager<Subscriber>,
    monitor: Arc<Mutex<ExitMonitor>>,
    stop_handle: StopHandle,
    resize_handle: ResizeHandle,
    shutdown_handle: ShutdownHandle,
    stop_vcpus: Arc<AtomicBool>,
    vcpu_threads: Vec<JoinHandle<()>>,
    // Kept alive for as long as vCPUs may run; dropped after they are joined.
    _mem: GuestMemoryMmap,
    _vm: VmFd,
    _kvm: Kvm,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpu_threads.len())
            .finish_non_exhaustive()
    }
}

/// How long [`Vm`] waits for vCPU threads to leave KVM_RUN when stopping.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);
const VCPU_KICK_INTERVAL: Duration = Duration::from_millis(2);

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

impl Vm {
    fn start(
        kvm: Kvm,
        vm: VmFd,
        mem: GuestMemoryMmap,
        vcpus: Vec<Vcpu>,
        events: DeviceEvents,
        config: &VmConfig,
        output: ConsoleOutput,
    ) -> Result<Vm, Error> {
        let console = &config.console;
        let DeviceEvents {
            serial,
            serial_fifo_room,
            poweroff,
            reset,
            subscribers,
            virtio_console,
            i8042,
        } = events;
        let eventfd_err = |e| Error::Devices(DeviceError::EventFd(e));
        let stop_handle = StopHandle::new().map_err(eventfd_err)?;
        let vcpu_exited = EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd_err)?;
        let (report, vcpu_reports) = channel();
        let monitor = Arc::new(Mutex::new(ExitMonitor {
            poweroff,
            reset,
            vcpu_exited: vcpu_exited.try_clone().map_err(eventfd_err)?,
            vcpu_reports,
            stop: stop_handle.clone(),
            outcome: None,
        }));
        let mut event_manager = EventManager::<Subscriber>::new().map_err(Error::EventLoop)?;
        event_manager.add_subscriber(monitor.clone());
        for subscriber in subscribers {
            event_manager.add_subscriber(subscriber);
        }
        let resize = ResizeHandle::new().map_err(eventfd_err)?;
        let sink_console = virtio_console.as_ref().map(|(device, _)| device.clone());
        let (sink, sink_room): (console::SharedSink, EventFd) = match virtio_console {
            Some((device, room)) => {
                event_manager.add_subscriber(Arc::new(Mutex::new(ConsoleResize::new(
                    resize.clone(),
                    device.clone(),
                ))));
                (device, room)
            }
            None => (serial, serial_fifo_room),
        };
        if let ConsoleOutput::Socket { hub, listener } = output {
            let server = ConsoleServer::new(
                listener,
                hub,
                sink,
                sink_room,
                sink_console,
                stop_handle.clone(),
            )
            .map_err(|e| Error::Console(ConsoleError::Socket(e)))?;
            event_manager.add_subscriber(Arc::new(Mutex::new(server)));
        } else if console.stdin {
            let input = ConsoleInput::new(
                &std::io::stdin().as_raw_fd(),
                sink,
                sink_room,
                console.escape,
                stop_handle.clone(),
            );
            event_manager.add_subscriber(Arc::new(Mutex::new(input)));
        }

        // SAFETY: the handler is empty, which is trivially async-signal-safe.
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| VcpuError::SpawnThread {
            vcpu: 0,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let stop_vcpus = Arc::new(AtomicBool::new(false));
        let mut running = Vm {
            event_manager,
            monitor,
            stop_handle,
            resize_handle: resize,
            shutdown_handle: ShutdownHandle { i8042 },
            stop_vcpus,
            vcpu_threads: Vec::new(),
            _mem: mem,
            _vm: vm,
            _kvm: kvm,
        };
        let console_log = matches!(console.backend, ConsoleBackend::Socket { .. });
        for (index, vcpu) in (0u8..).zip(vcpus) {
            let filter = match config.seccomp {
                true => Some(seccomp::vcpu(console_log).compile(&format!("vcpu{index}"))?),
                false => None,
            };
            let thread = spawn_vcpu(
                vcpu,
                index,
                filter,
                running.stop_vcpus.clone(),
                report.clone(),
                vcpu_exited.try_clone().map_err(eventfd_err)?,
            )?;
            running.vcpu_threads.push(thread);
        }
        Ok(running)
    }

    /// A handle that stops this VM (for signal handlers).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop_handle.clone()
    }

    /// A handle that asks the guest to shut down cleanly.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown_handle.clone()
    }

    /// A handle that tells the VM the host terminal changed size (for a SIGWINCH handler).
    pub fn resize_handle(&self) -> ResizeHandle {
        self.resize_handle.clone()
    }

    /// Serves devices and console until the VM ends, then stops the vCPUs.
    pub fn run_until_exit(mut self) -> Result<VmExit, Error> {
        let outcome = loop {
            if let Some(outcome) = lock(&self.monitor).outcome.take() {
                break outcome;
            }
            self.event_manager.run().map_err(Error::EventLoop)?;
        };
        self.stop_vcpus();
        outcome
    }

    fn stop_vcpus(&mut self) {
        self.stop_vcpus.store(true, Ordering::Release);
        let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
        // A kick can land just before a vCPU enters KVM_RUN and be lost, so keep kicking until
        // every thread has left.
        while self.vcpu_threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            for thread in self.vcpu_threads.iter().filter(|t| !t.is_finished()) {
                if let Err(err) = thread.kill(SIGRTMIN()) {
                    log::debug!("cannot kick a vCPU thread: {err}");
                }
            }
            std::thread::sleep(VCPU_KICK_INTERVAL);
        }
        for thread in self.vcpu_threads.drain(..) {
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                log::warn!("a vCPU thread did not stop in time; leaving it behind");
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.vcpu_threads.is_empty() {
            self.stop_vcpus();
        }
    }
}

/// Starts vCPU `index` on a thread of its own, which drops its capabilities and installs
/// `filter` before its first KVM_RUN.
fn spawn_vcpu(
    mut vcpu: Vcpu,
    index: u8,
    filter: Option<seccomp::Filter>,
    stop: Arc<AtomicBool>,
    report: Sender<(u8, VcpuOutcome)>,
    exited: EventFd,
) -> Result<JoinHandle<()>, VcpuError> {
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            let installed = seccomp::confine(&format!("vcpu{index}"), filter.as_ref(), &[]);
            let outcome = match installed {
                Ok(()) => vcpu.run(&stop),
                Err(source) => VcpuOutcome::Error(VcpuError::Seccomp {
                    vcpu: index,
                    source,
                }),
            };
            // The receiver only disappears when the VM is being torn down anyway.
            let _ = report.send((index, outcome));
            let _ = exited.write(1);
        })
        .map_err(|source| VcpuError::SpawnThread {
            vcpu: index,
            source,
        })
}
