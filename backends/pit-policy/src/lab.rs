//! The experiment: a one-vCPU KVM VM with the in-kernel irqchip and PIT, a real-mode guest
//! that counts IRQ0, and a host that withholds the vCPU (does not call `KVM_RUN`) in a
//! chosen pattern. The guest's own counter, read from guest memory, says how many ticks
//! arrived; wall-clock time and the programmed rate say how many were due.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use devshare_common::pit::LostTickPolicy;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::guest;
use crate::reinject::{set_pit_reinject, ReinjectError};
use crate::stall::StallPattern;

/// Samples within this many ticks of the wall-clock expectation count as "caught up"
/// (one tick of rounding, one of injection latency).
pub const CATCH_UP_TOLERANCE_TICKS: i64 = 2;

/// Where the vCPU is parked for its stalls and how long it waits to leave `KVM_RUN`.
const KICK_RETRY: Duration = Duration::from_micros(200);
const KICK_TIMEOUT: Duration = Duration::from_secs(2);
/// A reading of the counter counts only if it took at most this long.
const TIGHT_READ: Duration = Duration::from_micros(20);
/// Time zero needs a tick seen within this window.
const BRACKET: Duration = Duration::from_micros(200);
/// How long the guest gets to take its first PIT tick before the lab gives up.
const FIRST_TICK_TIMEOUT: Duration = Duration::from_secs(3);
/// Where the lab maps guest RAM; KVM on Intel needs a 3-page TSS area in real mode.
const TSS_ADDR: usize = 0xfffb_d000;

/// Why the lab could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// `/dev/kvm` cannot be opened (absent, no permission, module not loaded).
    #[error("no usable /dev/kvm: {0}")]
    KvmUnavailable(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl or step that failed.
        what: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Setting the PIT policy failed.
    #[error(transparent)]
    Reinject(#[from] ReinjectError),
    /// Guest RAM could not be mapped.
    #[error("cannot map guest RAM: {0}")]
    Memory(io::Error),
    /// The guest never counted a tick: the PIT or the interrupt path does not work here.
    #[error("the guest counted no PIT tick within {0:?}: the in-kernel PIT/PIC path does not deliver IRQ0 here")]
    GuestSilent(Duration),
    /// The vCPU stopped with an exit the guest program never causes.
    #[error("vCPU stopped unexpectedly: {0}")]
    VcpuExit(String),
    /// The vCPU thread did not leave `KVM_RUN` when asked.
    #[error("the vCPU thread did not leave KVM_RUN within {0:?}")]
    VcpuStuck(Duration),
    /// The vCPU thread could not be started or signalled.
    #[error("vCPU thread: {0}")]
    Thread(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> LabError {
    move |source| LabError::Kvm { what, source }
}

/// Guest RAM: an anonymous private mapping registered as memory slot 0.
struct GuestRam {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this struct until drop; all accesses after
// set-up go through atomics (the counter) so sharing it between threads is sound.
unsafe impl Send for GuestRam {}
// SAFETY: as above; `&GuestRam` only allows atomic reads.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    fn new(image: &[u8]) -> Result<Self, LabError> {
        let len = image.len();
        // SAFETY: anonymous mapping with no address hint; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(LabError::Memory(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| LabError::Memory(io::Error::other("mmap returned NULL")))?;
        // SAFETY: the mapping is `len` bytes, writable, and not yet shared with anyone.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), ptr.as_ptr(), len) };
        Ok(GuestRam { ptr, len })
    }

    /// The counter with the moment it was read, retried until the read itself was not
    /// interrupted for longer than [`TIGHT_READ`] (the midpoint is the moment).
    fn read_tight(&self) -> (Instant, u32) {
        loop {
            let before = Instant::now();
            let ticks = self.ticks();
            let after = Instant::now();
            let took = after.duration_since(before);
            if took <= TIGHT_READ {
                return (before + took / 2, ticks);
            }
        }
    }

    /// The guest's tick counter as the guest last wrote it.
    fn ticks(&self) -> u32 {
        // SAFETY: COUNTER_ADDR is 4-aligned and inside the mapping, which lives as long as
        // `self`; the guest writes it with one aligned 32-bit `inc`, so an atomic load sees
        // either the old or the new value.
        let counter = unsafe {
            &*self
                .ptr
                .as_ptr()
                .add(guest::COUNTER_ADDR)
                .cast::<AtomicU32>()
        };
        counter.load(Ordering::Relaxed)
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the VM that used it is dropped
        // first (field order in `LabVm`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A KVM VM set up for the lab: RAM with the guest program, in-kernel irqchip, and
/// (after [`LabVm::create_pit`]) the in-kernel PIT.
pub struct LabVm {
    // Drop order matters: the VM (and its memory slot) goes before the RAM.
    vm: VmFd,
    _kvm: Kvm,
    ram: Arc<GuestRam>,
}

impl LabVm {
    /// Opens `/dev/kvm`, creates a VM with guest RAM holding the program for a PIT channel-0
    /// `divisor`, and the in-kernel irqchip (PIC, IOAPIC, LAPIC). No PIT yet.
    pub fn new(divisor: u16) -> Result<Self, LabError> {
        let kvm = Kvm::new().map_err(LabError::KvmUnavailable)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if let Err(e) = vm.set_tss_address(TSS_ADDR) {
            // Only Intel VMX real mode needs it; other KVMs may refuse harmlessly.
            log::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        let ram = Arc::new(GuestRam::new(&guest::ram_image(divisor))?);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.len as u64,
            userspace_addr: ram.ptr.as_ptr() as u64,
        };
        // SAFETY: the region is our own mapping of `ram.len` bytes, kept alive (Arc in
        // `self.ram`) until after the VM fd is closed.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        Ok(LabVm { vm, _kvm: kvm, ram })
    }

    /// Creates the in-kernel i8254 PIT (`KVM_CREATE_PIT2`).
    pub fn create_pit(&self) -> Result<(), LabError> {
        self.vm
            .create_pit2(kvm_pit_config::default())
            .map_err(kvm_err("KVM_CREATE_PIT2"))
    }

    /// Sets the PIT lost-tick policy with `KVM_REINJECT_CONTROL`.
    pub fn set_policy(&self, policy: LostTickPolicy) -> Result<(), ReinjectError> {
        set_pit_reinject(&self.vm, policy)
    }

    /// The VM file descriptor.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    fn boot_vcpu(&self) -> Result<VcpuFd, LabError> {
        let vcpu = self.vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        // Real mode, every segment at 0: CS:IP = 0:CODE_ADDR, DS = 0 for the counter.
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs {
            rip: guest::CODE_ADDR as u64,
            rsp: guest::STACK_TOP,
            rflags: 0x2, // bit 1 is reserved-set; IF off until the program's sti
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(vcpu)
    }
}

/// Whether this machine's `/dev/kvm` can run the lab (VM, irqchip, PIT and reinject control).
/// The error says what is missing.
pub fn probe_kvm() -> Result<(), LabError> {
    let vm = LabVm::new(guest::divisor_for_rate(1000))?;
    vm.create_pit()?;
    vm.set_policy(LostTickPolicy::Delay)?;
    Ok(())
}

/// What one lab run does.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Requested PIT rate in Hz (the programmed rate is the nearest the divisor allows).
    pub rate_hz: u32,
    /// How long the stall pattern runs.
    pub duration: Duration,
    /// How long the guest runs undisturbed after the last stall (catch-up time).
    pub settle: Duration,
    /// When the vCPU is withheld.
    pub pattern: StallPattern,
    /// Seed for random patterns, so both policies see the same stalls.
    pub seed: u64,
    /// How often the host reads the guest's counter for the time series.
    pub sample_every: Duration,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            rate_hz: 1000,
            duration: Duration::from_secs(3),
            settle: Duration::from_millis(500),
            pattern: StallPattern::Periodic {
                stall: Duration::from_millis(50),
                period: Duration::from_millis(150),
            },
            seed: 1,
            sample_every: Duration::from_millis(1),
        }
    }
}

/// One reading of the guest's counter.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Seconds since time zero, when the guest loaded the PIT counter.
    pub t: f64,
    /// Ticks the guest had counted.
    pub ticks: u32,
}

/// The outcome of running the pattern under one policy.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRun {
    /// The policy set with `KVM_REINJECT_CONTROL`.
    pub policy: LostTickPolicy,
    /// Seconds from time zero to the final reading.
    pub elapsed_s: f64,
    /// When (seconds since time zero) the figures below were taken: the reading after the
    /// last stall where the guest was least behind.
    pub measured_at_s: f64,
    /// Ticks due then, by wall clock and programmed rate.
    pub expected_ticks: u64,
    /// Ticks the guest had counted then.
    pub counted_ticks: u64,
    /// `expected - counted`: ticks that never arrived. Ticks still pending for
    /// re-injection are late, not lost, so this is the smallest lag after the last stall.
    pub lost_ticks: i64,
    /// The lag at the final reading (includes ticks still on their way).
    pub behind_at_end: i64,
    /// `lost / expected`, in percent.
    pub lost_percent: f64,
    /// Number of stalls performed.
    pub stalls: usize,
    /// Total time the vCPU was withheld, in seconds.
    pub stalled_s: f64,
    /// The largest lag seen (ticks behind wall clock) at any sample.
    pub max_behind_ticks: i64,
    /// Milliseconds from the end of the last stall until the guest was within
    /// [`CATCH_UP_TOLERANCE_TICKS`] of wall clock; `None` if it never was (or no stalls).
    pub catch_up_ms: Option<f64>,
    /// The counter over time.
    #[serde(skip)]
    pub samples: Vec<Sample>,
    /// The stalls as `(start, end)` seconds since time zero.
    #[serde(skip)]
    pub stall_windows: Vec<(f64, f64)>,
}

/// The two policies' runs side by side, and what they were run with.
#[derive(Debug, Clone, Serialize)]
pub struct LabReport {
    /// Programmed PIT rate in Hz.
    pub rate_hz: f64,
    /// Channel-0 divisor.
    pub divisor: u16,
    /// The stall pattern, as given on the command line.
    pub pattern: String,
    /// Seconds the pattern ran.
    pub duration_s: f64,
    /// Seconds of undisturbed running after it.
    pub settle_s: f64,
    /// Which KVM module provides `/dev/kvm` (from /proc/modules), if known.
    pub kvm_module: Option<String>,
    /// One run per policy.
    pub runs: Vec<PolicyRun>,
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only makes KVM_RUN return EINTR.
}

fn kick_signal() -> Result<libc::c_int, LabError> {
    static REGISTER: Once = Once::new();
    let mut result = Ok(());
    REGISTER.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), on_kick);
    });
    result.map_err(|e| LabError::Thread(format!("cannot install the kick signal handler: {e}")))?;
    Ok(SIGRTMIN())
}

/// Flags shared by the controller and the vCPU thread.
#[derive(Default)]
struct VcpuControl {
    /// Controller: stay out of KVM_RUN.
    hold: AtomicBool,
    /// vCPU thread: I am out of KVM_RUN and waiting.
    held: AtomicBool,
    /// Controller: leave.
    stop: AtomicBool,
}

fn vcpu_loop(mut vcpu: VcpuFd, control: &VcpuControl) -> Result<(), LabError> {
    loop {
        if control.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        if control.hold.load(Ordering::Acquire) {
            control.held.store(true, Ordering::Release);
            while control.hold.load(Ordering::Acquire) && !control.stop.load(Ordering::Acquire) {
                thread::park();
            }
            control.held.store(false, Ordering::Release);
            continue;
        }
        match vcpu.run() {
            Ok(VcpuExit::Intr) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Ok(exit) => return Err(LabError::VcpuExit(format!("{exit:?}"))),
            Err(e) => {
                return Err(LabError::Kvm {
                    what: "KVM_RUN",
                    source: e,
                })
            }
        }
    }
}

struct VcpuThread {
    handle: Option<JoinHandle<Result<(), LabError>>>,
    control: Arc<VcpuControl>,
    signal: libc::c_int,
}

impl VcpuThread {
    fn start(vcpu: VcpuFd) -> Result<Self, LabError> {
        let signal = kick_signal()?;
        let control = Arc::new(VcpuControl::default());
        let thread_control = control.clone();
        let handle = thread::Builder::new()
            .name("lab-vcpu0".into())
            .spawn(move || vcpu_loop(vcpu, &thread_control))
            .map_err(|e| LabError::Thread(e.to_string()))?;
        Ok(VcpuThread {
            handle: Some(handle),
            control,
            signal,
        })
    }

    fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    fn kick(&self) {
        if let Some(h) = &self.handle {
            // Failing to signal a thread that just exited is fine: `finished` reports it.
            let _ = h.kill(self.signal);
        }
    }

    /// Takes the vCPU out of KVM_RUN and keeps it out; returns once it is out.
    fn hold(&self) -> Result<(), LabError> {
        self.control.hold.store(true, Ordering::Release);
        let deadline = Instant::now() + KICK_TIMEOUT;
        // Repeat the kick: one sent just before the thread enters KVM_RUN would be lost.
        while !self.control.held.load(Ordering::Acquire) {
            if self.finished() {
                return Err(LabError::VcpuExit("the vCPU thread ended early".into()));
            }
            if Instant::now() > deadline {
                return Err(LabError::VcpuStuck(KICK_TIMEOUT));
            }
            self.kick();
            thread::sleep(KICK_RETRY);
        }
        Ok(())
    }

    fn release(&self) {
        self.control.hold.store(false, Ordering::Release);
        if let Some(h) = &self.handle {
            h.thread().unpark();
        }
    }

    /// The error to report when the run fails: the thread's own error if it ended with
    /// one, else `seen`.
    fn failure(&mut self, seen: Option<LabError>) -> LabError {
        match (self.stop(), seen) {
            (Err(e), _) => e,
            (Ok(()), Some(e)) => e,
            (Ok(()), None) => LabError::VcpuExit("the vCPU thread ended early".into()),
        }
    }

    fn stop(&mut self) -> Result<(), LabError> {
        self.control.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + KICK_TIMEOUT;
        while !self.finished() {
            if Instant::now() > deadline {
                return Err(LabError::VcpuStuck(KICK_TIMEOUT));
            }
            if let Some(h) = &self.handle {
                h.thread().unpark();
            }
            self.kick();
            thread::sleep(KICK_RETRY);
        }
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(LabError::Thread("the vCPU thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        if self.handle.is_some() {
            if let Err(e) = self.stop() {
                log::warn!("stopping the vCPU thread: {e}");
            }
        }
    }
}

/// Ticks due `t` seconds after the PIT started at `rate` Hz.
fn expected_at(t: f64, rate: f64) -> i64 {
    (t * rate).floor() as i64
}

/// Runs the guest under `policy` with `config`'s stall pattern and measures it.
pub fn run_policy(policy: LostTickPolicy, config: &LabConfig) -> Result<PolicyRun, LabError> {
    let divisor = guest::divisor_for_rate(config.rate_hz);
    let rate = guest::rate_for_divisor(divisor);
    let vm = LabVm::new(divisor)?;
    vm.create_pit()?;
    vm.set_policy(policy)?;
    let vcpu = vm.boot_vcpu()?;
    let ram = vm.ram.clone();
    let mut cpu = VcpuThread::start(vcpu)?;

    // The stall schedule starts at a tick the host saw happen: the counter stepped by one
    // between two readings at most BRACKET apart. (The exact time zero for "expected" is
    // fixed after the run, from all samples.)
    let started = Instant::now();
    let (mut last_at, mut last) = ram.read_tight();
    let (t0, first) = loop {
        thread::sleep(Duration::from_micros(50));
        let (at, ticks) = ram.read_tight();
        if ticks == last.wrapping_add(1) && at.duration_since(last_at) <= BRACKET {
            break (at, ticks);
        }
        (last_at, last) = (at, ticks);
        if cpu.finished() {
            return Err(cpu.failure(None));
        }
        if started.elapsed() > FIRST_TICK_TIMEOUT {
            if ticks == 0 {
                return Err(LabError::GuestSilent(FIRST_TICK_TIMEOUT));
            }
            // Ticking, but never caught in the act: the host is very busy; time it loosely.
            log::warn!("{policy}: no tick seen within {BRACKET:?}; the schedule starts late");
            break (at, ticks);
        }
    };
    log::debug!("{policy}: tick {first} seen {:?} after start", t0 - started);

    let windows = config.pattern.windows(config.duration, config.seed);
    let total = config.duration + config.settle;
    let mut samples = vec![Sample {
        t: 0.0,
        ticks: first,
    }];
    let mut stall_windows = Vec::with_capacity(windows.len());
    let mut next = 0;
    let mut stall_started: Option<Duration> = None;
    loop {
        let (at, ticks) = ram.read_tight();
        let elapsed = at.duration_since(t0);
        let t = elapsed.as_secs_f64();
        samples.push(Sample { t, ticks });
        if elapsed >= total {
            break;
        }
        if cpu.finished() {
            return Err(cpu.failure(None));
        }
        let mut next_event = total;
        if let Some(&(start, end)) = windows.get(next) {
            match stall_started {
                None if elapsed >= start => {
                    if let Err(e) = cpu.hold() {
                        return Err(cpu.failure(Some(e)));
                    }
                    stall_started = Some(t0.elapsed());
                    next_event = end;
                }
                None => next_event = start,
                Some(began) if elapsed >= end => {
                    cpu.release();
                    stall_windows.push((began.as_secs_f64(), t0.elapsed().as_secs_f64()));
                    stall_started = None;
                    next += 1;
                    next_event = windows.get(next).map_or(total, |w| w.0);
                }
                Some(_) => next_event = end,
            }
        }
        let now = t0.elapsed();
        let wait = next_event.saturating_sub(now).min(config.sample_every);
        thread::sleep(wait);
    }
    cpu.stop()?;

    // Re-anchor time zero where the PIT started. A tick is never delivered before it is
    // due, so for every sample `t - ticks/rate` is at or after the PIT's start, and the
    // smallest of them is the tightest bound. Ticks delivered late (by a stall or a busy
    // host), including the one the live loop anchored on, cannot pull it off.
    let zero = samples
        .iter()
        .map(|s| s.t - f64::from(s.ticks) / rate)
        .fold(f64::INFINITY, f64::min);
    let zero = if zero.is_finite() { zero } else { 0.0 };
    for s in &mut samples {
        s.t -= zero;
    }
    for w in &mut stall_windows {
        *w = (w.0 - zero, w.1 - zero);
    }
    let behind = |s: &Sample| expected_at(s.t, rate) - i64::from(s.ticks);
    let max_behind = samples.iter().map(behind).max().unwrap_or(0);

    // A tick still pending (re-injected later) is late, not lost; a lost tick never comes
    // back. So the ticks lost for good are the smallest lag seen once the stalls are over.
    let stalls_over = stall_windows
        .last()
        .map_or(config.duration.as_secs_f64(), |w| w.1);
    let last = samples
        .last()
        .copied()
        .unwrap_or(Sample { t: 0.0, ticks: 0 });
    let settled = samples
        .iter()
        .filter(|s| s.t >= stalls_over)
        .min_by_key(|s| behind(s))
        .copied()
        .unwrap_or(last);
    let expected = expected_at(settled.t, rate).max(1);
    let lost = expected - i64::from(settled.ticks);
    let catch_up_ms = stall_windows.last().and_then(|&(_, end)| {
        samples
            .iter()
            .filter(|s| s.t >= end)
            .find(|s| behind(s) <= CATCH_UP_TOLERANCE_TICKS)
            .map(|s| (s.t - end) * 1000.0)
    });
    Ok(PolicyRun {
        policy,
        elapsed_s: last.t,
        measured_at_s: settled.t,
        expected_ticks: expected as u64,
        counted_ticks: u64::from(settled.ticks),
        behind_at_end: expected_at(last.t, rate) - i64::from(last.ticks),
        lost_ticks: lost,
        lost_percent: 100.0 * lost as f64 / expected as f64,
        stalls: stall_windows.len(),
        stalled_s: stall_windows.iter().fold(0.0, |sum, (s, e)| sum + (e - s)),
        max_behind_ticks: max_behind,
        catch_up_ms,
        samples,
        stall_windows,
    })
}

/// Which KVM module provides `/dev/kvm` (e.g. `kvm_intel`, `kvm_amd`, `kvm_pvm`), from
/// /sys/module (present even where /proc/modules is hidden).
pub fn kvm_module() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/module")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("kvm_"))
        .collect();
    names.sort();
    (!names.is_empty()).then(|| names.join("+"))
}

/// Runs the same pattern under each of `policies`, one after the other.
pub fn run_lab(
    config: &LabConfig,
    pattern_text: &str,
    policies: &[LostTickPolicy],
) -> Result<LabReport, LabError> {
    let divisor = guest::divisor_for_rate(config.rate_hz);
    let mut runs = Vec::with_capacity(policies.len());
    for &policy in policies {
        log::info!("running the guest with lost_tick_policy={policy} ...");
        runs.push(run_policy(policy, config)?);
    }
    Ok(LabReport {
        rate_hz: guest::rate_for_divisor(divisor),
        divisor,
        pattern: pattern_text.to_owned(),
        duration_s: config.duration.as_secs_f64(),
        settle_s: config.settle.as_secs_f64(),
        kvm_module: kvm_module(),
        runs,
    })
}

impl LabReport {
    /// The human-readable side-by-side table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "PIT at {:.2} Hz (divisor {}), stalls {}, {:.1} s + {:.1} s settle{}\n\n",
            self.rate_hz,
            self.divisor,
            self.pattern,
            self.duration_s,
            self.settle_s,
            self.kvm_module
                .as_deref()
                .map(|m| format!(", /dev/kvm from {m}"))
                .unwrap_or_default()
        );
        out.push_str(
            "expected/counted/lost: at the reading after the last stall where the guest was \
             least behind\n(ticks still pending are late, not lost); end lag: at the final reading\n\n",
        );
        out.push_str(&format!(
            "{:<9} {:>9} {:>9} {:>7} {:>8} {:>7} {:>10} {:>10} {:>12} {:>11}\n",
            "policy",
            "expected",
            "counted",
            "lost",
            "lost %",
            "stalls",
            "stalled s",
            "max behind",
            "catch-up ms",
            "end lag"
        ));
        for r in &self.runs {
            let catch_up = match (r.catch_up_ms, r.stalls) {
                (_, 0) => "n/a".to_owned(),
                (Some(ms), _) => format!("{ms:.1}"),
                (None, _) => "never".to_owned(),
            };
            out.push_str(&format!(
                "{:<9} {:>9} {:>9} {:>7} {:>8.2} {:>7} {:>10.3} {:>10} {:>12} {:>11}\n",
                r.policy.as_str(),
                r.expected_ticks,
                r.counted_ticks,
                r.lost_ticks,
                r.lost_percent,
                r.stalls,
                r.stalled_s,
                r.max_behind_ticks,
                catch_up,
                r.behind_at_end
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_counts_whole_periods() {
        assert_eq!(expected_at(0.0, 1000.0), 0);
        assert_eq!(expected_at(0.0999, 1000.0), 99);
        assert_eq!(expected_at(1.0, 100.0), 100);
    }
}
