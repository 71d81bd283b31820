//! The `/dev/kvm` backend (stock KVM, rust-vmm's `kvm-ioctls`): the same
//! run loop and guest payload as on `/dev/s2pin`, for the stock-KVM rows of
//! the NUMA benchmark (issue 10).
//!
//! KVM's exits are mapped onto [`Exit`]: a store to the payload's UART data
//! register ([`guest::UART_BASE`], the payload's argument bit 4) becomes a
//! one-byte [`Exit::Console`]; reads of the UART (its flag register) are
//! answered 0 here; other MMIO is [`Exit::Mmio`]; PSCI `SYSTEM_OFF` and
//! `SYSTEM_RESET` (handled by KVM, `KVM_ARM_VCPU_PSCI_0_2`) are
//! [`Exit::SystemEvent`]; PSCI `CPU_ON` of a vCPU created powered off is
//! served by KVM itself. KVM has no pinning counters: [`Vm::stats`] is all
//! zeros (the benchmark counts KVM's stage-2 work with kprobes instead).

use kvm_bindings::{
    kvm_userspace_memory_region, kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2,
    KVM_MEM_READONLY, KVM_REG_ARM64, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use s2pin_uapi::{Exit, RunConsole, RunMmio, RunSystemEvent, S2pinVmStats, SystemEventType};

use crate::backend::{Backend, DeviceError, DeviceResult, Region, Vcpu, VcpuStart, Vm, VmSpec};

/// Bytes of the emulated UART window (a PL011's registers).
const UART_SIZE: u64 = 0x1000;

/// `KVM_REG_ARM_CORE` register id of the 64-bit core register at byte
/// offset `off` of `struct kvm_regs` (the id counts 32-bit words).
const fn core_reg(off: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (off / 4)
}
/// `regs.regs[0]` (x0) is the first field of `struct kvm_regs`.
const REG_X0: u64 = core_reg(0);
/// `regs.pc` follows `regs[31]` and `sp`: byte offset 32 * 8.
const REG_PC: u64 = core_reg(32 * 8);

fn err(call: &'static str, e: &kvm_ioctls::Error) -> DeviceError {
    DeviceError {
        call,
        err: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// An open `/dev/kvm`.
#[derive(Debug)]
pub struct KvmDevice {
    kvm: Kvm,
}

impl KvmDevice {
    /// Opens `/dev/kvm`.
    pub fn open() -> DeviceResult<Self> {
        Kvm::new().map(|kvm| Self { kvm }).map_err(|e| {
            err(
                "open /dev/kvm (is the kernel running KVM: booted at EL2?)",
                &e,
            )
        })
    }
}

impl Backend for KvmDevice {
    type Vm = KvmVm;

    fn create_vm(&self, spec: &VmSpec) -> DeviceResult<KvmVm> {
        // The policy is the s2pin module's; KVM has its own (eager) one.
        let vm = self
            .kvm
            .create_vm_with_ipa_size(spec.ipa_bits)
            .map_err(|e| err("KVM_CREATE_VM", &e))?;
        let mut init = kvm_vcpu_init::default();
        vm.get_preferred_target(&mut init)
            .map_err(|e| err("KVM_ARM_PREFERRED_TARGET", &e))?;
        Ok(KvmVm { vm, init })
    }
}

/// A KVM VM.
#[derive(Debug)]
pub struct KvmVm {
    vm: VmFd,
    init: kvm_vcpu_init,
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn set_user_memory_region(&self, r: &Region) -> DeviceResult<()> {
        let region = kvm_userspace_memory_region {
            slot: r.slot,
            flags: if r.readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: r.userspace_addr,
        };
        // SAFETY: the caller's guest memory mapping covers
        // [userspace_addr, +memory_size) and outlives the VM (s2vmm keeps
        // it until after the vCPUs and the VM are dropped); KVM checks the
        // range itself and fails cleanly on a bad one.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| err("KVM_SET_USER_MEMORY_REGION", &e))
    }

    fn create_vcpu(&self, index: u32, start: VcpuStart) -> DeviceResult<KvmVcpu> {
        let fd = self
            .vm
            .create_vcpu(u64::from(index))
            .map_err(|e| err("KVM_CREATE_VCPU", &e))?;
        let mut init = self.init;
        init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        if start == VcpuStart::Off {
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        fd.vcpu_init(&init)
            .map_err(|e| err("KVM_ARM_VCPU_INIT", &e))?;
        if let VcpuStart::On { entry, x0 } = start {
            fd.set_one_reg(REG_PC, &entry.to_le_bytes())
                .map_err(|e| err("KVM_SET_ONE_REG pc", &e))?;
            fd.set_one_reg(REG_X0, &x0.to_le_bytes())
                .map_err(|e| err("KVM_SET_ONE_REG x0", &e))?;
        }
        Ok(KvmVcpu { fd })
    }

    fn stats(&self) -> DeviceResult<S2pinVmStats> {
        Ok(S2pinVmStats::default())
    }
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
}

/// What one `KVM_RUN` exit means to s2vmm.
enum Mapped {
    Exit(Exit),
    /// A UART read, answered 0: run again.
    Again,
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(bytes) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

fn map_exit(e: VcpuExit<'_>) -> Mapped {
    let uart = guest::UART_BASE..guest::UART_BASE + UART_SIZE;
    match e {
        VcpuExit::MmioWrite(addr, data) if addr == guest::UART_BASE => {
            let mut c = RunConsole::default();
            if let (Some(b), Some(d)) = (c.bytes.first_mut(), data.first()) {
                *b = *d;
                c.len = 1;
            }
            Mapped::Exit(Exit::Console(c))
        }
        // Other UART registers: writes ignored, reads 0 (the flag
        // register: never busy).
        VcpuExit::MmioWrite(addr, _) if uart.contains(&addr) => Mapped::Again,
        VcpuExit::MmioRead(addr, data) if uart.contains(&addr) => {
            data.fill(0);
            Mapped::Again
        }
        VcpuExit::MmioWrite(addr, data) => Mapped::Exit(Exit::Mmio(RunMmio {
            phys_addr: addr,
            data: le_u64(data),
            len: u32::try_from(data.len()).unwrap_or(0),
            is_write: 1,
            ..RunMmio::default()
        })),
        VcpuExit::MmioRead(addr, data) => Mapped::Exit(Exit::Mmio(RunMmio {
            phys_addr: addr,
            data: 0,
            len: u32::try_from(data.len()).unwrap_or(0),
            is_write: 0,
            ..RunMmio::default()
        })),
        VcpuExit::SystemEvent(ty, _) => {
            let t = match ty {
                KVM_SYSTEM_EVENT_SHUTDOWN => SystemEventType::SystemOff as u32,
                KVM_SYSTEM_EVENT_RESET => SystemEventType::SystemReset as u32,
                other => 0x100 + other,
            };
            Mapped::Exit(Exit::SystemEvent(RunSystemEvent {
                ty: t,
                ..RunSystemEvent::default()
            }))
        }
        VcpuExit::Intr => Mapped::Exit(Exit::Intr),
        VcpuExit::Hlt => Mapped::Again,
        // The exit code as s2vmm's "unknown exit" (the run loop ends with an error).
        VcpuExit::FailEntry(reason, _) => Mapped::Exit(Exit::Unknown(
            0x1000 + u32::try_from(reason & 0xfff).unwrap_or(0),
        )),
        VcpuExit::InternalError => Mapped::Exit(Exit::Unknown(0x2000)),
        _ => Mapped::Exit(Exit::Unknown(0x3000)),
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> DeviceResult<Exit> {
        loop {
            match self.fd.run() {
                Ok(e) => match map_exit(e) {
                    Mapped::Exit(x) => return Ok(x),
                    Mapped::Again => {}
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    return Ok(Exit::Intr)
                }
                Err(e) => return Err(err("KVM_RUN", &e)),
            }
        }
    }

    fn complete_mmio_read(&mut self, data: u64) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_MMIO (the run loop calls this
        // only after an MMIO read exit), so `mmio` is the union's live
        // field; KVM copies `data` into the guest register at the next RUN.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = usize::try_from(mmio.len).unwrap_or(0).min(8);
        let bytes = data.to_le_bytes();
        for (d, s) in mmio.data.iter_mut().zip(bytes.iter()).take(len) {
            *d = *s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_match_the_kernel_abi() {
        // arch/arm64/include/uapi/asm/kvm.h: KVM_REG_ARM_CORE_REG(regs.pc)
        // is word 64; x0 is word 0.
        assert_eq!(REG_PC, 0x6030_0000_0010_0040);
        assert_eq!(REG_X0, 0x6030_0000_0010_0000);
    }

    #[test]
    fn uart_bytes_become_console_exits_and_reads_are_answered() {
        let mut byte = [b'g'];
        match map_exit(VcpuExit::MmioWrite(guest::UART_BASE, &byte)) {
            Mapped::Exit(Exit::Console(c)) => assert_eq!(c.text(), b"g"),
            _ => panic!("not a console exit"),
        }
        let mut fr = [0xffu8; 4];
        assert!(matches!(
            map_exit(VcpuExit::MmioRead(guest::UART_BASE + 0x18, &mut fr)),
            Mapped::Again
        ));
        assert_eq!(fr, [0; 4]);
        byte[0] = 7;
        match map_exit(VcpuExit::MmioWrite(0x0a00_0010, &byte)) {
            Mapped::Exit(Exit::Mmio(m)) => {
                assert_eq!(
                    (m.phys_addr, m.data, m.len, m.is_write),
                    (0x0a00_0010, 7, 1, 1)
                );
            }
            _ => panic!("not an MMIO exit"),
        }
        match map_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[])) {
            Mapped::Exit(Exit::SystemEvent(s)) => {
                assert_eq!(s.ty, SystemEventType::SystemOff as u32);
            }
            _ => panic!("not a system event"),
        }
    }
}
