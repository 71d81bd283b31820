//! What the VMM needs from a hypervisor device, as traits: `/dev/s2pin`
//! implements them ([`crate::s2pin`]), and so does `/dev/kvm` (`crate::kvm`,
//! arm64 only, its exits mapped onto [`Exit`]). The run loop
//! ([`crate::runner`]) and the tests' fake device use only these.

use s2pin_uapi::{Exit, S2pinVmStats};

use crate::args::Policy;

/// A failed device call: which call, and the errno.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {err}")]
pub struct DeviceError {
    /// The call (`S2PIN_CREATE_VM`, `open /dev/s2pin`, ...).
    pub call: &'static str,
    /// What the kernel said.
    pub err: std::io::Error,
}

impl DeviceError {
    /// `call` failed with the current `errno`.
    #[must_use]
    pub fn last(call: &'static str) -> Self {
        Self {
            call,
            err: std::io::Error::last_os_error(),
        }
    }

    /// The raw errno, if any.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        self.err.raw_os_error()
    }
}

/// Result of a device call.
pub type DeviceResult<T> = Result<T, DeviceError>;

/// What a new VM looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// IPA size.
    pub ipa_bits: u32,
    /// MMU-notifier policy.
    pub policy: Policy,
    /// The guest RAM window: faults inside are memory, outside MMIO.
    pub mem_base: u64,
    /// Bytes of the window.
    pub mem_size: u64,
}

/// A memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Slot id.
    pub slot: u32,
    /// First IPA.
    pub guest_phys_addr: u64,
    /// Bytes (0 deletes the slot).
    pub memory_size: u64,
    /// Host virtual address of the backing memory.
    pub userspace_addr: u64,
    /// The guest may only read it.
    pub readonly: bool,
}

/// How a new vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuStart {
    /// Powered on at `entry` with `x0`.
    On {
        /// Entry IPA.
        entry: u64,
        /// The guest's x0.
        x0: u64,
    },
    /// Powered off until a PSCI CPU_ON of another vCPU.
    Off,
}

/// A hypervisor device that creates VMs.
pub trait Backend {
    /// Its VMs.
    type Vm: Vm;
    /// Creates a VM.
    fn create_vm(&self, spec: &VmSpec) -> DeviceResult<Self::Vm>;
}

/// A VM.
pub trait Vm: Send + Sync {
    /// Its vCPUs.
    type Vcpu: Vcpu + Send;
    /// Creates, or with size 0 deletes, a memory slot.
    fn set_user_memory_region(&self, r: &Region) -> DeviceResult<()>;
    /// Creates vCPU `index`.
    fn create_vcpu(&self, index: u32, start: VcpuStart) -> DeviceResult<Self::Vcpu>;
    /// Reads the VM's counters.
    fn stats(&self) -> DeviceResult<S2pinVmStats>;
}

/// A vCPU.
pub trait Vcpu {
    /// Runs until an exit user space must handle; a signal gives
    /// [`Exit::Intr`] (the call's `EINTR`), not an error.
    fn run(&mut self) -> DeviceResult<Exit>;
    /// The value the guest's MMIO read (the last exit) returns.
    fn complete_mmio_read(&mut self, data: u64);
}
