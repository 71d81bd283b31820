//! `s2vmm hostile`: user space that misbehaves on purpose. Each case prints
//! `PASS <name> (<what happened>)` or `FAIL <name>: <expected>, got <what>`;
//! the exit status is 0 only if every case passed. The errnos expected are
//! the uapi's (`s2pin-uapi` crate docs).

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use s2pin_uapi::{Exit, MemFaultKind, S2pinCreateVcpu, S2pinCreateVm, S2pinUserspaceMemoryRegion};

use crate::args::{Backing, Policy};
use crate::backend::{Backend, Region, Vcpu, VcpuStart, Vm, VmSpec};
use crate::layout::{Image, Plan, IMAGE_OFFSET, IPA_BITS, PAGE, RAM_BASE, TEST_OFFSET};
use crate::memory::GuestMemory;
use crate::runner;
use crate::s2pin::{S2pin, S2pinVcpu, S2pinVm};

#[derive(Debug, Default)]
struct Tally {
    passed: u32,
    failed: u32,
}

impl Tally {
    fn check(&mut self, name: &str, ok: bool, what: &str) {
        if ok {
            self.passed += 1;
            println!("PASS {name} ({what})");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {what}");
        }
    }

    /// `r` must fail with `want`.
    fn errno<T>(&mut self, name: &str, r: Result<T, crate::backend::DeviceError>, want: i32) {
        match r {
            Ok(_) => self.check(name, false, &format!("expected errno {want}, got success")),
            Err(e) => {
                let got = e.errno();
                self.check(
                    name,
                    got == Some(want),
                    &format!(
                        "errno {} ({}){}",
                        got.unwrap_or(0),
                        e.err,
                        if got == Some(want) {
                            String::new()
                        } else {
                            format!(", expected {want}")
                        }
                    ),
                );
            }
        }
    }
}

fn region(slot: u32, gpa: u64, size: u64, uaddr: u64) -> S2pinUserspaceMemoryRegion {
    S2pinUserspaceMemoryRegion {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: uaddr,
    }
}

/// A VM running the payload from a memory of its own.
struct Guest {
    vm: S2pinVm,
    _mem: GuestMemory,
    image: Image,
}

fn guest(dev: &S2pin, image: &[u8], plan: &Plan) -> anyhow::Result<Guest> {
    let img = Image::parse(image)?;
    let ram = plan.ram_bytes();
    let mem = GuestMemory::new(usize::try_from(ram)?, Backing::Anon, None)?;
    mem.write(IMAGE_OFFSET, image)?;
    let vm = dev.create_vm(&VmSpec {
        ipa_bits: IPA_BITS,
        policy: Policy::Confirm,
        mem_base: RAM_BASE,
        mem_size: ram,
    })?;
    vm.set_user_memory_region(&mem.ram_slot())?;
    Ok(Guest {
        vm,
        _mem: mem,
        image: img,
    })
}

/// A touch guest that never prints and never ends (its vCPU stays in RUN).
fn endless(dev: &S2pin, image: &[u8]) -> anyhow::Result<(Guest, S2pinVcpu)> {
    let plan = Plan {
        mode: crate::args::GuestMode::Touch,
        vcpus: 1,
        mem: 1 << 20,
        reports: 0,
        passes_log2: 31,
    };
    let g = guest(dev, image, &plan)?;
    let v = g.vm.create_vcpu(
        0,
        VcpuStart::On {
            entry: g.image.entry(),
            x0: plan.arg(),
        },
    )?;
    Ok((g, v))
}

fn read_debugfs(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/kernel/debug/s2pin/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runs the cases; returns the exit status.
pub fn run(image_path: &std::path::Path) -> anyhow::Result<i32> {
    let image = std::fs::read(image_path).with_context(|| format!("{}", image_path.display()))?;
    runner::install_kick_handler().map_err(anyhow::Error::msg)?;
    let mut t = Tally::default();
    let dev = S2pin::open()?;

    // CREATE_VM arguments.
    let good = S2pinCreateVm {
        ipa_bits: IPA_BITS,
        policy: 0,
        flags: 0,
        mem_base: RAM_BASE,
        mem_size: 4 << 20,
    };
    t.errno(
        "CREATE_VM with unknown flags",
        dev.create_vm_raw(&S2pinCreateVm { flags: 1, ..good }),
        libc::EINVAL,
    );
    t.errno(
        "CREATE_VM with policy 7",
        dev.create_vm_raw(&S2pinCreateVm { policy: 7, ..good }),
        libc::EINVAL,
    );
    t.errno(
        "CREATE_VM with ipa_bits 60",
        dev.create_vm_raw(&S2pinCreateVm {
            ipa_bits: 60,
            ..good
        }),
        libc::EINVAL,
    );
    t.errno(
        "CREATE_VM with a RAM window that overflows",
        dev.create_vm_raw(&S2pinCreateVm {
            mem_base: u64::MAX - 4095,
            mem_size: 8192,
            ..good
        }),
        libc::EINVAL,
    );

    // Memory slots.
    let vm = dev.create_vm_raw(&good)?;
    let mem = GuestMemory::new(4 << 20, Backing::Anon, None)?;
    let ua = mem.addr();
    t.check(
        "a valid slot is accepted",
        vm.set_region_raw(&region(0, RAM_BASE, 2 << 20, ua)).is_ok(),
        "slot 0, 2 MiB",
    );
    t.errno(
        "overlapping slot",
        vm.set_region_raw(&region(1, RAM_BASE + (1 << 20), 2 << 20, ua + (2 << 20))),
        libc::EEXIST,
    );
    t.errno(
        "changing a used slot",
        vm.set_region_raw(&region(0, RAM_BASE, 1 << 20, ua)),
        libc::EEXIST,
    );
    t.errno(
        "unaligned guest address",
        vm.set_region_raw(&region(2, RAM_BASE + (2 << 20) + 1, PAGE, ua + (2 << 20))),
        libc::EINVAL,
    );
    t.errno(
        "unaligned size",
        vm.set_region_raw(&region(2, RAM_BASE + (2 << 20), PAGE + 1, ua + (2 << 20))),
        libc::EINVAL,
    );
    t.errno(
        "unaligned userspace_addr",
        vm.set_region_raw(&region(2, RAM_BASE + (2 << 20), PAGE, ua + (2 << 20) + 8)),
        libc::EINVAL,
    );
    t.errno(
        "guest range that overflows",
        vm.set_region_raw(&region(2, !0xfff_u64, 2 * PAGE, ua)),
        libc::EINVAL,
    );
    t.errno(
        "user range that overflows",
        vm.set_region_raw(&region(2, RAM_BASE + (2 << 20), 2 * PAGE, !0xfff_u64)),
        libc::EINVAL,
    );
    t.errno(
        "size beyond the RAM window",
        vm.set_region_raw(&region(2, RAM_BASE + (2 << 20), 4 << 20, ua)),
        libc::EINVAL,
    );
    t.errno(
        "kernel userspace_addr",
        vm.set_region_raw(&region(
            2,
            RAM_BASE + (2 << 20),
            PAGE,
            0xffff_8000_0000_0000,
        )),
        libc::EINVAL,
    );
    t.errno(
        "slot id 32",
        vm.set_region_raw(&region(32, RAM_BASE + (2 << 20), PAGE, ua + (2 << 20))),
        libc::EINVAL,
    );
    t.errno(
        "unknown slot flags",
        vm.set_region_raw(&S2pinUserspaceMemoryRegion {
            flags: 1 << 7,
            ..region(2, RAM_BASE + (2 << 20), PAGE, ua + (2 << 20))
        }),
        libc::EINVAL,
    );
    t.check(
        "deleting a slot",
        vm.set_region_raw(&region(0, RAM_BASE, 0, ua)).is_ok(),
        "size 0",
    );
    t.errno(
        "vCPU index beyond the limit",
        vm.create_vcpu_raw(&S2pinCreateVcpu {
            index: 4096,
            flags: 0,
            entry: RAM_BASE,
            x0: 0,
        }),
        libc::EINVAL,
    );
    t.errno(
        "vCPU with unknown flags",
        vm.create_vcpu_raw(&S2pinCreateVcpu {
            index: 0,
            flags: 1 << 5,
            entry: RAM_BASE,
            x0: 0,
        }),
        libc::EINVAL,
    );
    drop(vm);
    drop(mem);

    unmapped_userspace_addr(&dev, &image, &mut t)?;
    other_process(&dev, &image, &mut t)?;
    two_threads_one_vcpu(&dev, &image, &mut t)?;
    close_vm_while_running(&dev, &image, &mut t)?;
    memlock_limit(&image, &mut t)?;

    // Nothing leaked: every VM of this process is gone.
    drop(dev);
    std::thread::sleep(Duration::from_millis(200));
    match (read_debugfs("pinned"), read_debugfs("vms")) {
        (Some(p), Some(v)) => t.check(
            "nothing pinned and no VM left",
            p == 0 && v == 0,
            &format!("debugfs pinned {p}, vms {v}"),
        ),
        _ => t.check(
            "nothing pinned and no VM left",
            false,
            "no /sys/kernel/debug/s2pin/{pinned,vms}",
        ),
    }
    println!("s2vmm hostile: {} passed, {} failed", t.passed, t.failed);
    Ok(i32::from(t.failed > 0))
}

/// A slot whose user memory is not mapped: accepted; the guest's first
/// touch of it exits as a memory fault the host denies, not an oops.
fn unmapped_userspace_addr(dev: &S2pin, image: &[u8], t: &mut Tally) -> anyhow::Result<()> {
    let plan = Plan {
        mode: crate::args::GuestMode::Fill,
        vcpus: 1,
        mem: 1 << 20,
        reports: 0,
        passes_log2: 0,
    };
    let img = Image::parse(image)?;
    let mem = GuestMemory::new(usize::try_from(TEST_OFFSET)?, Backing::Anon, None)?;
    mem.write(IMAGE_OFFSET, image)?;
    // A hole: map, remember the address, unmap.
    let hole = GuestMemory::new(1 << 20, Backing::Anon, None)?;
    let hole_addr = hole.addr();
    drop(hole);
    let vm = dev.create_vm(&VmSpec {
        ipa_bits: IPA_BITS,
        policy: Policy::Confirm,
        mem_base: RAM_BASE,
        mem_size: plan.ram_bytes(),
    })?;
    vm.set_user_memory_region(&Region {
        slot: 0,
        guest_phys_addr: RAM_BASE,
        memory_size: TEST_OFFSET,
        userspace_addr: mem.addr(),
        readonly: false,
    })?;
    let r = vm.set_user_memory_region(&Region {
        slot: 1,
        guest_phys_addr: RAM_BASE + TEST_OFFSET,
        memory_size: 1 << 20,
        userspace_addr: hole_addr,
        readonly: false,
    });
    t.check(
        "a slot over unmapped user memory is accepted",
        r.is_ok(),
        &format!("{r:?}"),
    );
    let mut v = vm.create_vcpu(
        0,
        VcpuStart::On {
            entry: img.entry(),
            x0: plan.arg(),
        },
    )?;
    let t0 = Instant::now();
    let got = loop {
        match v.run() {
            Ok(Exit::MemFault(f)) => {
                break format!(
                    "mem fault gpa {:#x} kind {} error {}",
                    f.gpa, f.kind, f.error
                )
            }
            Ok(Exit::SystemEvent(_)) => break "the guest ended".into(),
            Ok(_) if t0.elapsed() < Duration::from_secs(30) => continue,
            Ok(e) => break format!("no fault after 30 s (last {e:?})"),
            Err(e) => break format!("RUN failed: {e}"),
        }
    };
    let ok = got.starts_with(&format!(
        "mem fault gpa {:#x} kind {}",
        RAM_BASE + TEST_OFFSET,
        MemFaultKind::HostDenied as u32
    ));
    t.check(
        "the guest's touch of unmapped user memory exits as HOST_DENIED",
        ok,
        &got,
    );
    Ok(())
}

fn send_fd(sock: RawFd, fd: RawFd) -> nix::Result<()> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(sock, &[IoSlice::new(b"f")], &cmsg, MsgFlags::empty(), None).map(|_| ())
}

fn recv_fd(sock: RawFd) -> Option<RawFd> {
    let mut buf = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::empty()).ok()?;
    msg.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
        _ => None,
    })
}

/// A vCPU and VM fd passed to another process over a unix socket: RUN,
/// SET_USER_MEMORY_REGION and CREATE_VCPU there fail with EIO.
fn other_process(dev: &S2pin, image: &[u8], t: &mut Tally) -> anyhow::Result<()> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: no other thread runs now (the hostile cases run one at a
    // time); the child only makes system calls and exits.
    match unsafe { fork() }? {
        ForkResult::Child => {
            let code = (|| {
                let vcpu = recv_fd(b.as_raw_fd())?;
                let vm = recv_fd(b.as_raw_fd())?;
                // SAFETY: fds received just now, owned by this process.
                let run = unsafe { libc::ioctl(vcpu, s2pin_uapi::S2PIN_RUN as _, 0) };
                let e_run = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                let r = region(3, RAM_BASE, PAGE, 0x1000_0000);
                // SAFETY: as above; `r` lives across the call.
                let set = unsafe {
                    libc::ioctl(
                        vm,
                        s2pin_uapi::S2PIN_SET_USER_MEMORY_REGION as _,
                        &raw const r,
                    )
                };
                let e_set = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                let ok = run < 0 && e_run == libc::EIO && set < 0 && e_set == libc::EIO;
                Some(if ok { 0 } else { 10 + (e_run & 0x3f) })
            })()
            .unwrap_or(99);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        ForkResult::Parent { child } => {
            let (g, v) = endless(dev, image)?;
            let sent = send_fd(a.as_raw_fd(), v.raw_fd())
                .and_then(|()| send_fd(a.as_raw_fd(), g.vm.raw_fd()));
            let st = waitpid(child, None)?;
            let what = match (sent, st) {
                (Err(e), _) => format!("sending the fds: {e}"),
                (Ok(()), WaitStatus::Exited(_, 0)) => {
                    "RUN and SET_USER_MEMORY_REGION: EIO".to_string()
                }
                (Ok(()), WaitStatus::Exited(_, 99)) => "the child got no fds".to_string(),
                (Ok(()), WaitStatus::Exited(_, c)) => format!(
                    "RUN errno {} (or the slot call did not fail with EIO)",
                    c - 10
                ),
                (Ok(()), s) => format!("child {s:?}"),
            };
            t.check(
                "RUN and SET_USER_MEMORY_REGION from another process (fds over a unix socket)",
                matches!(st, WaitStatus::Exited(_, 0)),
                &what,
            );
            drop(v);
            drop(g);
        }
    }
    Ok(())
}

/// Runs `vcpu` on a thread until `stop`; returns the errors RUN gave.
fn runner_thread(
    mut v: S2pinVcpu,
    stop: &std::sync::atomic::AtomicBool,
    tid: &std::sync::atomic::AtomicU64,
) -> (S2pinVcpu, Vec<String>) {
    // SAFETY: no preconditions.
    tid.store(
        unsafe { libc::pthread_self() } as u64,
        std::sync::atomic::Ordering::SeqCst,
    );
    let mut errors = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        match v.run() {
            Ok(_) => {}
            Err(e) => {
                errors.push(e.to_string());
                if errors.len() > 3 {
                    break;
                }
            }
        }
    }
    (v, errors)
}

fn kick(tid: &std::sync::atomic::AtomicU64) {
    let id = tid.load(std::sync::atomic::Ordering::SeqCst);
    if id != 0 {
        // SAFETY: the pthread_t of a thread of this scope that is not yet
        // joined; the signal's handler does nothing.
        unsafe { libc::pthread_kill(id as libc::pthread_t, runner::kick_signal()) };
    }
}

/// Stops a runner thread: flag, then kicks until it returned.
fn stop_runner<T>(
    h: std::thread::ScopedJoinHandle<'_, T>,
    stop: &std::sync::atomic::AtomicBool,
    tid: &std::sync::atomic::AtomicU64,
) -> Option<T> {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let t0 = Instant::now();
    while !h.is_finished() {
        if t0.elapsed() > Duration::from_secs(20) {
            println!("FAIL a vCPU thread does not leave RUN on a signal within 20 s");
            std::process::exit(1);
        }
        kick(tid);
        std::thread::sleep(Duration::from_millis(5));
    }
    h.join().ok()
}

/// Two threads RUN one vCPU: the second gets EBUSY.
fn two_threads_one_vcpu(dev: &S2pin, image: &[u8], t: &mut Tally) -> anyhow::Result<()> {
    let (g, v) = endless(dev, image)?;
    let fd = v.raw_fd();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let tid = std::sync::atomic::AtomicU64::new(0);
    let mut seen = Vec::new();
    std::thread::scope(|s| {
        let h = s.spawn(|| runner_thread(v, &stop, &tid));
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: `fd` stays open: the vCPU is owned by the runner thread,
        // which returns it only after this loop.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        for _ in 0..50 {
            // SAFETY: RUN on a vCPU fd; only the errno matters here.
            let rc = unsafe { libc::ioctl(borrowed.as_raw_fd(), s2pin_uapi::S2PIN_RUN as _, 0) };
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            seen.push(if rc < 0 { e } else { 0 });
            if rc < 0 && e == libc::EBUSY {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop_runner(h, &stop, &tid);
    });
    t.check(
        "a second thread's RUN of a running vCPU",
        seen.last() == Some(&libc::EBUSY),
        &format!("errnos {seen:?} (EBUSY is {})", libc::EBUSY),
    );
    drop(g);
    Ok(())
}

/// Closing the VM fd while its vCPU runs: the run goes on or ends cleanly,
/// the vCPU thread leaves RUN on a signal, and closing the vCPU fd then
/// frees everything (checked at the end of the suite).
fn close_vm_while_running(dev: &S2pin, image: &[u8], t: &mut Tally) -> anyhow::Result<()> {
    let (g, v) = endless(dev, image)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let tid = std::sync::atomic::AtomicU64::new(0);
    let Guest { vm, _mem: mem, .. } = g;
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| runner_thread(v, &stop, &tid));
        std::thread::sleep(Duration::from_millis(500));
        vm.close();
        std::thread::sleep(Duration::from_millis(500));
        stop_runner(h, &stop, &tid)
    });
    match out {
        Some((v, errors)) => {
            drop(v);
            t.check(
                "closing the VM fd while its vCPU runs",
                true,
                &if errors.is_empty() {
                    "the vCPU ran on until stopped".to_string()
                } else {
                    format!("RUN then failed cleanly: {}", errors.join("; "))
                },
            );
        }
        None => t.check(
            "closing the VM fd while its vCPU runs",
            false,
            "the vCPU thread panicked",
        ),
    }
    drop(mem);
    Ok(())
}

/// Drops CAP_IPC_LOCK from this process's effective and permitted sets (so
/// that RLIMIT_MEMLOCK applies to it, as to an unprivileged VMM).
fn drop_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    const VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget with a version-3 header and room for its two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut h, d.as_mut_ptr()) } != 0 {
        return false;
    }
    d[0].effective &= !(1 << CAP_IPC_LOCK);
    d[0].permitted &= !(1 << CAP_IPC_LOCK);
    // SAFETY: capset with the same header and the sets just read, minus one bit.
    unsafe { libc::syscall(libc::SYS_capset, &raw mut h, d.as_ptr()) == 0 }
}

/// A VMM without CAP_IPC_LOCK and a 1 MiB RLIMIT_MEMLOCK runs a guest that
/// touches 4 MiB: RUN fails with ENOMEM once the limit is reached (a clear
/// error), and nothing stays pinned when the process ends.
fn memlock_limit(image: &[u8], t: &mut Tally) -> anyhow::Result<()> {
    // SAFETY: no other thread runs now; the child only makes system calls
    // (and allocates, which is safe after fork in a process whose other
    // threads have all been joined) and exits.
    match unsafe { fork() }? {
        ForkResult::Child => {
            let code = (|| -> anyhow::Result<i32> {
                if !drop_ipc_lock() {
                    return Ok(20);
                }
                let lim = libc::rlimit {
                    rlim_cur: 1 << 20,
                    rlim_max: 1 << 20,
                };
                // SAFETY: setrlimit with a valid struct.
                if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const lim) } != 0 {
                    return Ok(21);
                }
                let dev = S2pin::open()?;
                let plan = Plan {
                    mode: crate::args::GuestMode::Fill,
                    vcpus: 1,
                    mem: 4 << 20,
                    reports: 0,
                    passes_log2: 0,
                };
                let g = guest(&dev, image, &plan)?;
                let mut v = g.vm.create_vcpu(
                    0,
                    VcpuStart::On {
                        entry: g.image.entry(),
                        x0: plan.arg(),
                    },
                )?;
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(60) {
                    match v.run() {
                        Ok(Exit::SystemEvent(_)) => return Ok(22),
                        Ok(_) => {}
                        Err(e) if e.errno() == Some(libc::ENOMEM) => return Ok(0),
                        Err(e) => return Ok(30 + e.errno().unwrap_or(0).clamp(0, 60)),
                    }
                }
                Ok(23)
            })()
            .unwrap_or(99);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        ForkResult::Parent { child } => {
            let st = waitpid(child, None)?;
            let what = match st {
                WaitStatus::Exited(_, 0) => "RUN failed with ENOMEM at the limit".to_string(),
                WaitStatus::Exited(_, 20) => "could not drop CAP_IPC_LOCK".to_string(),
                WaitStatus::Exited(_, 22) => {
                    "the guest filled 4 MiB despite a 1 MiB limit".to_string()
                }
                WaitStatus::Exited(_, 23) => "no error within 60 s".to_string(),
                WaitStatus::Exited(_, c) if (30..=90).contains(&c) => {
                    format!("RUN failed with errno {}", c - 30)
                }
                s => format!("child {s:?}"),
            };
            t.check(
                "RLIMIT_MEMLOCK of 1 MiB without CAP_IPC_LOCK: a 4 MiB guest's RUN fails with ENOMEM",
                matches!(st, WaitStatus::Exited(_, 0)),
                &what,
            );
        }
    }
    Ok(())
}
