//! `s2vmm hostile-guests`: guests that misbehave, run on the real path
//! (`/dev/s2pin`, s2pin.ko, EL2), issue 12 item 5. Each case is one VM of
//! one vCPU running the guest payload with an argument that makes it
//! misbehave; the VM must end with a clear exit (the one the case names),
//! and s2vmm and the host must go on. The cases:
//!
//! * `calls`: the payload's hostile mode, 23 malformed guest calls
//!   (console lengths, share requests out of range, unknown ids, host calls
//!   from a guest, a call over SMC, `HVC #1`) and PSCI abuse (`CPU_ON` of
//!   vCPU 63, `AFFINITY_INFO` of an absent MPIDR); each must get the ABI's
//!   error, then the guest shuts down;
//! * `read-outside`, `write-outside`, `spin-outside`: a read, a write and
//!   a read loop at IPA `0x8000_0000`, outside guest RAM and every device:
//!   an MMIO exit at exactly that address, which the VMM refuses (the run
//!   ends there);
//! * `read-far-outside`: a read at 252 GiB, far above guest RAM where no
//!   stage-2 table exists: an MMIO exit at exactly that address;
//! * `unmapped-va`: a read at 512 GiB, beyond the payload's own stage-1 map
//!   (the VM's 40-bit IPA space is not reachable past it with this
//!   payload): the guest takes its own exception, reports it and shuts
//!   down; it never reads a value;
//! * `mmio-burst`: 255 reads of the MMIO test device, each answered;
//! * `mmio-storm`: the payload's console over the UART, one MMIO exit per
//!   byte, 2000 reports (tens of thousands of exits), then PSCI
//!   `SYSTEM_OFF`;
//! * `probe-*`: the seven trapped registers/instructions (PMU, debug, SVE,
//!   physical timer, ACTLR, LORegions, RAS): an unhandled-trap exit of the
//!   probe's exception class, never `allowed`;
//! * `bad-argument`: an argument the payload cannot decode: it says so and
//!   shuts down;
//! * `fill-after`: then an ordinary 16 MiB fill must pass.
//!
//! At the end the nothing-leaked check ([`crate::leakcheck`]) against the
//! machine before the first case. One `PASS`/`FAIL` line per case; exit
//! status 0 when all passed.

use std::path::PathBuf;

use guest::{Arg, Mode, Op, Probe};

/// `s2vmm hostile-guests`'s options.
#[derive(Clone, Debug, clap::Args)]
pub struct HostileGuestsArgs {
    /// The guest payload image.
    #[arg(long, default_value = "/root/guest.bin")]
    pub image: PathBuf,
    /// Reports of the MMIO storm (each about 17 console bytes, one MMIO exit per byte).
    #[arg(long, default_value_t = 2000)]
    pub storm_reports: u16,
}

/// IPA outside guest RAM and every device.
pub const OUTSIDE_IPA: u64 = 0x8000_0000;
/// A high IPA, far from guest RAM (252 GiB): no stage-2 table exists
/// anywhere near it.
pub const FAR_IPA: u64 = 0x3f_0000_0000;
/// An address beyond the payload's own stage-1 map (it identity-maps the
/// first 256 GiB): the guest faults in its own translation, before stage 2.
pub const UNMAPPED_VA: u64 = 1 << 39;

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// A system event (`SystemEventType` code).
    Event(u32),
    /// An MMIO access the VMM does not emulate.
    Mmio {
        /// Address.
        addr: u64,
        /// A write.
        write: bool,
    },
    /// A memory fault the module handed up.
    MemFault {
        /// Page address.
        gpa: u64,
        /// `MemFaultKind` code.
        kind: u32,
    },
    /// An unhandled trap.
    Unhandled {
        /// ESR_EL2.
        esr: u64,
    },
    /// An exit code s2vmm does not know.
    Unknown(u32),
    /// `RUN` failed.
    Error(String),
    /// No end within the time limit.
    Timeout,
}

/// What a run produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// How it ended.
    pub end: Option<End>,
    /// The guest's console lines (the first 4096).
    pub lines: Vec<String>,
    /// MMIO exits served.
    pub mmio_exits: u64,
    /// Console exits (guest calls).
    pub console_exits: u64,
    /// Share/unshare request exits.
    pub request_exits: u64,
}

/// What a case expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The hostile mode: shutdown after "N passed, 0 failed".
    Calls,
    /// An MMIO exit at this address (read or write) ends it.
    MmioAt(u64, bool),
    /// The guest's own exception (reported on its console), then shutdown;
    /// never a completed read.
    GuestException,
    /// `n` reads of the test device, each its value, then shutdown.
    Burst(u8),
    /// `n` reports over the UART, then PSCI SYSTEM_OFF.
    Storm(u16),
    /// An unhandled trap of this exception class, never "allowed".
    Trap(u64),
    /// The payload reports a bad argument and shuts down.
    BadArg,
    /// A fill that passes.
    Fill,
}

/// One case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    /// Its name.
    pub name: &'static str,
    /// vCPU 0's x0.
    pub x0: u64,
    /// MiB of tested memory the VM gets.
    pub mib: u64,
    /// What must happen.
    pub expect: Expect,
}

fn poke(op: Op, ipa: u64, count: u8) -> u64 {
    Arg::poke(op, ipa >> 12, count).encode()
}

/// Every case, in order.
#[must_use]
pub fn cases(storm_reports: u16) -> Vec<Case> {
    let mut v = vec![
        Case {
            name: "calls",
            x0: Arg::new(Mode::Hostile).encode(),
            mib: 1,
            expect: Expect::Calls,
        },
        Case {
            name: "read-outside",
            x0: poke(Op::Read, OUTSIDE_IPA, 1),
            mib: 1,
            expect: Expect::MmioAt(OUTSIDE_IPA, false),
        },
        Case {
            name: "write-outside",
            x0: poke(Op::Write, OUTSIDE_IPA, 0),
            mib: 1,
            expect: Expect::MmioAt(OUTSIDE_IPA, true),
        },
        Case {
            name: "spin-outside",
            x0: poke(Op::Spin, OUTSIDE_IPA, 20),
            mib: 1,
            expect: Expect::MmioAt(OUTSIDE_IPA, false),
        },
        Case {
            name: "read-far-outside",
            x0: poke(Op::Read, FAR_IPA, 1),
            mib: 1,
            expect: Expect::MmioAt(FAR_IPA, false),
        },
        Case {
            name: "unmapped-va",
            x0: poke(Op::Read, UNMAPPED_VA, 1),
            mib: 1,
            expect: Expect::GuestException,
        },
        Case {
            name: "mmio-burst",
            x0: poke(Op::Read, guest::MMIO_TEST_BASE, 255),
            mib: 1,
            expect: Expect::Burst(255),
        },
        Case {
            name: "mmio-storm",
            x0: Arg {
                mib: 1,
                reports: storm_reports,
                passes_log2: 0,
                uart: true,
                ..Arg::new(Mode::Touch)
            }
            .encode(),
            mib: 1,
            expect: Expect::Storm(storm_reports),
        },
    ];
    for p in Probe::ALL {
        v.push(Case {
            name: match p {
                Probe::Pmu => "probe-pmu",
                Probe::Debug => "probe-debug",
                Probe::Sve => "probe-sve",
                Probe::PhysTimer => "probe-phys-timer",
                Probe::Actlr => "probe-actlr",
                Probe::Lor => "probe-lor",
                Probe::Ras => "probe-ras",
            },
            x0: Arg {
                mib: p as u16,
                ..Arg::new(Mode::Probe)
            }
            .encode(),
            mib: 1,
            expect: Expect::Trap(p.trap_class()),
        });
    }
    v.push(Case {
        name: "bad-argument",
        x0: 0xf,
        mib: 1,
        expect: Expect::BadArg,
    });
    v.push(Case {
        name: "fill-after",
        x0: Arg {
            mib: 16,
            ..Arg::new(Mode::Fill)
        }
        .encode(),
        mib: 16,
        expect: Expect::Fill,
    });
    v
}

const SHUTDOWN: u32 = s2pin_uapi::SystemEventType::Shutdown as u32;
const SYSTEM_OFF: u32 = s2pin_uapi::SystemEventType::SystemOff as u32;

/// Whether `o` is what `c` expects; the reason if not.
pub fn judge(c: &Case, o: &Outcome) -> Result<String, String> {
    let end = o.end.clone().unwrap_or(End::Timeout);
    let has = |p: &str| o.lines.iter().any(|l| l.contains(p));
    if matches!(end, End::Timeout | End::Error(_) | End::Unknown(_)) {
        return Err(format!("ended {end:?}"));
    }
    if has("guest: panic") {
        return Err("the payload panicked".into());
    }
    let ok = match c.expect {
        Expect::Calls => {
            let summary = o.lines.iter().find_map(|l| {
                let r = l.strip_prefix("guest: hostile: ")?;
                let (p, f) = r.split_once(" passed, ")?;
                Some((
                    p.parse::<u32>().ok()?,
                    f.strip_suffix(" failed")?.parse::<u32>().ok()?,
                ))
            });
            match summary {
                Some((p, 0)) if p > 0 && end == End::Event(SHUTDOWN) => {
                    return Ok(format!("{p} calls refused as the ABI says, then shutdown"))
                }
                _ => false,
            }
        }
        Expect::MmioAt(addr, write) => end == End::Mmio { addr, write },
        Expect::GuestException => {
            !has("guest: read") && has("guest: exception") && end == End::Event(SHUTDOWN)
        }
        Expect::Burst(n) => {
            let want = format!("guest: read {:#x}", guest::mmio_test_value(0));
            let reads = o.lines.iter().filter(|l| **l == want).count();
            reads == usize::from(n) && o.mmio_exits == u64::from(n) && end == End::Event(SHUTDOWN)
        }
        Expect::Storm(n) => {
            let last = format!("guest: passes {n}");
            let reports = o
                .lines
                .iter()
                .filter(|l| l.starts_with("guest: passes "))
                .count();
            let bytes: u64 = o.lines.iter().map(|l| l.len() as u64 + 1).sum();
            has(&last)
                && reports == usize::from(n)
                && o.mmio_exits >= bytes
                && end == End::Event(SYSTEM_OFF)
        }
        Expect::Trap(class) => {
            !has("allowed") && matches!(end, End::Unhandled { esr } if esr >> 26 == class)
        }
        Expect::BadArg => has("guest: bad argument") && end == End::Event(SHUTDOWN),
        Expect::Fill => has("PASS") && !has("FAIL") && end == End::Event(SHUTDOWN),
    };
    if ok {
        Ok(format!(
            "ended {end:?}; {} MMIO exits, {} console exits; last line: {}",
            o.mmio_exits,
            o.console_exits,
            o.lines.last().map_or("", String::as_str)
        ))
    } else {
        Err(format!(
            "ended {end:?}; {} MMIO exits; last line: {}",
            o.mmio_exits,
            o.lines.last().map_or("", String::as_str)
        ))
    }
}

#[cfg(target_os = "linux")]
pub use linux::run;

#[cfg(target_os = "linux")]
mod linux {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use s2pin_uapi::Exit;

    use super::{cases, judge, Case, End, HostileGuestsArgs, Outcome};
    use crate::args::{Backing, Policy};
    use crate::backend::{Backend, Vcpu, VcpuStart, Vm, VmSpec};
    use crate::layout::{Image, IMAGE_OFFSET, IPA_BITS, RAM_BASE, TEST_OFFSET};
    use crate::leakcheck::{self, Baseline};
    use crate::memory::GuestMemory;
    use crate::mmio::TestDevice;
    use crate::runner;
    use crate::s2pin::S2pin;

    /// Time one case may take.
    const LIMIT: Duration = Duration::from_secs(120);
    /// Console lines kept per case.
    const MAX_LINES: usize = 4096;
    /// The UART window (a PL011's registers; the data register at offset 0).
    const UART_SIZE: u64 = 0x1000;

    struct Console {
        partial: Vec<u8>,
        out: Outcome,
    }

    impl Console {
        fn bytes(&mut self, b: &[u8]) {
            for &c in b {
                if c == b'\n' {
                    let l = String::from_utf8_lossy(&self.partial).into_owned();
                    self.partial.clear();
                    if self.out.lines.len() < MAX_LINES {
                        self.out.lines.push(l);
                    }
                } else if self.partial.len() < 4096 {
                    self.partial.push(c);
                }
            }
        }
    }

    /// Runs one case to its end (or the time limit).
    fn run_case(dev: &S2pin, image: &[u8], c: &Case) -> anyhow::Result<Outcome> {
        let img = Image::parse(image)?;
        let ram = TEST_OFFSET + (c.mib << 20);
        let mem = GuestMemory::new(usize::try_from(ram)?, Backing::Anon, None)?;
        mem.write(IMAGE_OFFSET, image)?;
        let vm = dev.create_vm(&VmSpec {
            ipa_bits: IPA_BITS,
            policy: Policy::Confirm,
            mem_base: RAM_BASE,
            mem_size: ram,
        })?;
        vm.set_user_memory_region(&mem.ram_slot())?;
        let mut vcpu = vm.create_vcpu(
            0,
            VcpuStart::On {
                entry: img.entry(),
                x0: c.x0,
            },
        )?;
        let done = Arc::new(AtomicBool::new(false));
        // SAFETY: pthread_self has no preconditions.
        // (pthread_t is a pointer on musl: carried as an integer.)
        let me = unsafe { libc::pthread_self() } as usize;
        let watchdog = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                    if t0.elapsed() > LIMIT {
                        // SAFETY: `me` is the case's thread, alive until it
                        // sets `done` after this loop's last kick; the
                        // signal has an empty handler (no SA_RESTART).
                        unsafe { libc::pthread_kill(me as libc::pthread_t, runner::kick_signal()) };
                    }
                }
            })
        };
        let t0 = Instant::now();
        let mut dev_mmio = TestDevice::default();
        let mut con = Console {
            partial: Vec::new(),
            out: Outcome::default(),
        };
        let uart = guest::UART_BASE..guest::UART_BASE + UART_SIZE;
        let end = loop {
            if t0.elapsed() > LIMIT {
                break End::Timeout;
            }
            let exit = match vcpu.run() {
                Ok(e) => e,
                Err(e) => break End::Error(e.to_string()),
            };
            match exit {
                Exit::None | Exit::Intr | Exit::PendingWork => {}
                Exit::Console(k) => {
                    con.out.console_exits += 1;
                    con.bytes(k.text());
                }
                Exit::Mmio(m) if uart.contains(&m.phys_addr) => {
                    con.out.mmio_exits += 1;
                    if m.is_write != 0 {
                        if m.phys_addr == guest::UART_BASE {
                            con.bytes(&[m.data.to_le_bytes()[0]]);
                        }
                    } else {
                        vcpu.complete_mmio_read(0);
                    }
                }
                Exit::Mmio(m) => {
                    let r = if m.is_write != 0 {
                        dev_mmio.write(m.phys_addr, m.len, m.data).map(|()| None)
                    } else {
                        dev_mmio.read(m.phys_addr, m.len).map(Some)
                    };
                    match r {
                        Ok(Some(v)) => {
                            con.out.mmio_exits += 1;
                            vcpu.complete_mmio_read(v);
                        }
                        Ok(None) => con.out.mmio_exits += 1,
                        Err(_) => {
                            break End::Mmio {
                                addr: m.phys_addr,
                                write: m.is_write != 0,
                            }
                        }
                    }
                }
                Exit::MemFault(f) => {
                    break End::MemFault {
                        gpa: f.gpa,
                        kind: f.kind,
                    }
                }
                Exit::SystemEvent(s) => break End::Event(s.ty),
                Exit::UnhandledTrap(u) => break End::Unhandled { esr: u.esr },
                Exit::ShareRequest(_) | Exit::UnshareRequest(_) => con.out.request_exits += 1,
                Exit::Unknown(code) => break End::Unknown(code),
            }
        };
        done.store(true, Ordering::SeqCst);
        let _ = watchdog.join();
        if !con.partial.is_empty() {
            let p = std::mem::take(&mut con.partial);
            con.bytes(&p);
            con.bytes(b"\n");
        }
        con.out.end = Some(end);
        Ok(con.out)
    }

    /// Runs every case; returns the exit status.
    pub fn run(a: &HostileGuestsArgs) -> anyhow::Result<i32> {
        let image = std::fs::read(&a.image).with_context(|| format!("{}", a.image.display()))?;
        let dev = S2pin::open()?;
        runner::install_kick_handler().map_err(anyhow::Error::msg)?;
        let f0 = leakcheck::measure(10)?;
        let base = Baseline::of(&f0);
        let (mut pass, mut fail) = (0, 0);
        for c in cases(a.storm_reports) {
            let t0 = Instant::now();
            let o = run_case(&dev, &image, &c).with_context(|| c.name)?;
            let ms = t0.elapsed().as_millis();
            match judge(&c, &o) {
                Ok(what) => {
                    pass += 1;
                    println!("hostile-guests: PASS {}: {what} ({ms} ms)", c.name);
                }
                Err(why) => {
                    fail += 1;
                    println!("hostile-guests: FAIL {}: {why} ({ms} ms)", c.name);
                    for l in o.lines.iter().rev().take(5).rev() {
                        println!("hostile-guests:   guest: {l}");
                    }
                }
            }
        }
        drop(dev);
        let f = leakcheck::measure(10)?;
        let bad = leakcheck::problems(&f, Some(&base), 16 << 10);
        println!(
            "hostile-guests: {}",
            leakcheck::verdict_line(&f, Some(&base), &bad)
        );
        if bad.is_empty() {
            pass += 1;
        } else {
            fail += 1;
        }
        println!("hostile-guests: {pass} passed, {fail} failed");
        Ok(i32::from(fail != 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(end: End, lines: &[&str], mmio: u64) -> Outcome {
        Outcome {
            end: Some(end),
            lines: lines.iter().map(ToString::to_string).collect(),
            mmio_exits: mmio,
            ..Outcome::default()
        }
    }

    fn case(name: &str) -> Case {
        *cases(3).iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn every_argument_decodes_as_meant() {
        for c in cases(2000) {
            match c.expect {
                Expect::BadArg => assert!(Arg::decode(c.x0).is_err()),
                _ => {
                    let a = Arg::decode(c.x0).unwrap();
                    assert_eq!(a.encode(), c.x0, "{}", c.name);
                }
            }
        }
        let a = Arg::decode(case("read-far-outside").x0).unwrap();
        assert_eq!(a.gfn << 12, FAR_IPA);
        let a = Arg::decode(case("unmapped-va").x0).unwrap();
        assert_eq!(a.gfn << 12, UNMAPPED_VA);
        assert!(Arg::decode(case("mmio-storm").x0).unwrap().uart);
    }

    #[test]
    fn the_judge_accepts_the_expected_end_only() {
        let sd = End::Event(SHUTDOWN);
        let c = case("calls");
        assert!(judge(
            &c,
            &out(sd.clone(), &["guest: hostile: 23 passed, 0 failed"], 0)
        )
        .is_ok());
        assert!(judge(
            &c,
            &out(sd.clone(), &["guest: hostile: 22 passed, 1 failed"], 0)
        )
        .is_err());
        assert!(judge(
            &c,
            &out(End::Timeout, &["guest: hostile: 23 passed, 0 failed"], 0)
        )
        .is_err());
        let c = case("read-outside");
        let at = End::Mmio {
            addr: OUTSIDE_IPA,
            write: false,
        };
        assert!(judge(&c, &out(at, &[], 0)).is_ok());
        let elsewhere = End::Mmio {
            addr: OUTSIDE_IPA + 8,
            write: false,
        };
        assert!(judge(&c, &out(elsewhere, &[], 0)).is_err());
        let c = case("unmapped-va");
        let exc = "guest: exception slot 4 ESR 0x96000004 ELR 0x0 FAR 0x8000000000";
        assert!(judge(&c, &out(sd.clone(), &[exc], 0)).is_ok());
        assert!(judge(&c, &out(sd.clone(), &["guest: read 0x0"], 0)).is_err());
        assert!(judge(&c, &out(End::Unhandled { esr: 0 }, &[exc], 0)).is_err());
        let c = case("mmio-storm");
        let lines = [
            "guest: touch 1 MiB",
            "guest: passes 1",
            "guest: passes 2",
            "guest: passes 3",
        ];
        let bytes: u64 = lines.iter().map(|l| l.len() as u64 + 1).sum();
        assert!(judge(&c, &out(End::Event(SYSTEM_OFF), &lines, bytes)).is_ok());
        assert!(judge(&c, &out(End::Event(SYSTEM_OFF), &lines[..3], bytes)).is_err());
        assert!(judge(&c, &out(End::Event(SYSTEM_OFF), &lines, bytes - 1)).is_err());
        let c = case("probe-pmu");
        assert!(judge(&c, &out(End::Unhandled { esr: 0x18 << 26 }, &[], 0)).is_ok());
        assert!(judge(&c, &out(End::Unhandled { esr: 0x19 << 26 }, &[], 0)).is_err());
        assert!(judge(
            &c,
            &out(
                End::Unhandled { esr: 0x18 << 26 },
                &["guest: probe Pmu was allowed: 0x0"],
                0
            )
        )
        .is_err());
        let c = case("mmio-burst");
        let read = format!("guest: read {:#x}", guest::mmio_test_value(0));
        let lines: Vec<&str> = std::iter::repeat_n(read.as_str(), 255).collect();
        assert!(judge(&c, &out(sd.clone(), &lines, 255)).is_ok());
        assert!(judge(&c, &out(sd.clone(), &lines[..254], 254)).is_err());
        let c = case("fill-after");
        assert!(judge(&c, &out(sd.clone(), &["guest: checksum 0x1 PASS"], 0)).is_ok());
        assert!(judge(&c, &out(sd, &["guest: panic"], 0)).is_err());
    }
}
