//! The `/dev/s2pin` backend: the ioctls of `s2pin-uapi` on real fds.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use s2pin_uapi::{
    Exit, S2pinCreateVcpu, S2pinCreateVm, S2pinRun, S2pinUserspaceMemoryRegion, S2pinVmStats,
    S2PIN_API_VERSION, S2PIN_CREATE_VCPU, S2PIN_CREATE_VM, S2PIN_GET_API_VERSION, S2PIN_GET_STATS,
    S2PIN_GET_VCPU_MMAP_SIZE, S2PIN_MEM_READONLY, S2PIN_RUN, S2PIN_SET_USER_MEMORY_REGION,
    S2PIN_VCPU_START_OFF,
};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref};

use crate::args::Policy;
use crate::backend::{Backend, DeviceError, DeviceResult, Region, Vcpu, VcpuStart, Vm, VmSpec};

/// The device node.
pub const DEVICE: &str = "/dev/s2pin";
/// Where `cargo xtask run` puts the module; [`S2pin::open`] loads it from
/// there when the device is missing.
pub const MODULE: &str = "/root/s2pin.ko";

/// Loads [`MODULE`] with `finit_module` (as `insmod` does).
fn load_module() -> std::io::Result<()> {
    let f = File::open(MODULE)?;
    // SAFETY: finit_module(fd, "", 0) with an open fd and an empty,
    // NUL-terminated parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// The uapi policy code of `p`.
#[must_use]
pub fn policy_code(p: Policy) -> u32 {
    let u = match p {
        Policy::Confirm => s2pin_uapi::Policy::Confirm,
        Policy::Eager => s2pin_uapi::Policy::Eager,
        Policy::Keep => s2pin_uapi::Policy::Keep,
    };
    u as u32
}

/// An open `/dev/s2pin`.
#[derive(Debug)]
pub struct S2pin {
    dev: File,
    run_size: usize,
}

fn check(call: &'static str, rc: i32) -> DeviceResult<i32> {
    if rc < 0 {
        Err(DeviceError::last(call))
    } else {
        Ok(rc)
    }
}

/// An fd an ioctl returned.
fn owned(call: &'static str, rc: i32) -> DeviceResult<File> {
    let fd: RawFd = check(call, rc)?;
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

impl S2pin {
    /// Opens the device and checks its API version.
    pub fn open() -> DeviceResult<Self> {
        if !std::path::Path::new(DEVICE).exists() && std::path::Path::new(MODULE).exists() {
            eprintln!("s2vmm: {DEVICE} is missing; loading {MODULE}");
            load_module().map_err(|err| DeviceError {
                call: "finit_module /root/s2pin.ko",
                err,
            })?;
        }
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEVICE)
            .map_err(|err| DeviceError {
                call: "open /dev/s2pin (is s2pin.ko loaded?)",
                err,
            })?;
        // SAFETY: an ioctl without argument on our own fd.
        let v = check("S2PIN_GET_API_VERSION", unsafe {
            ioctl(&dev, S2PIN_GET_API_VERSION.into())
        })?;
        if v.unsigned_abs() != S2PIN_API_VERSION {
            return Err(DeviceError {
                call: "S2PIN_GET_API_VERSION",
                err: std::io::Error::other(format!(
                    "the module speaks API version {v}, s2vmm version {S2PIN_API_VERSION}"
                )),
            });
        }
        // SAFETY: as above.
        let size = check("S2PIN_GET_VCPU_MMAP_SIZE", unsafe {
            ioctl(&dev, S2PIN_GET_VCPU_MMAP_SIZE.into())
        })?;
        let run_size = usize::try_from(size).unwrap_or(0);
        if run_size < core::mem::size_of::<S2pinRun>() {
            return Err(DeviceError {
                call: "S2PIN_GET_VCPU_MMAP_SIZE",
                err: std::io::Error::other(format!("{size} bytes is too small a run structure")),
            });
        }
        Ok(Self { dev, run_size })
    }

    /// Creates a VM from a raw argument (the hostile tests).
    pub fn create_vm_raw(&self, arg: &S2pinCreateVm) -> DeviceResult<S2pinVm> {
        // SAFETY: the argument is a live #[repr(C)] struct of the size the
        // ioctl number encodes; the kernel only reads it.
        let rc = unsafe { ioctl_with_ref(&self.dev, S2PIN_CREATE_VM.into(), arg) };
        Ok(S2pinVm {
            fd: owned("S2PIN_CREATE_VM", rc)?,
            run_size: self.run_size,
        })
    }
}

impl Backend for S2pin {
    type Vm = S2pinVm;

    fn create_vm(&self, spec: &VmSpec) -> DeviceResult<S2pinVm> {
        self.create_vm_raw(&S2pinCreateVm {
            ipa_bits: spec.ipa_bits,
            policy: policy_code(spec.policy),
            flags: 0,
            mem_base: spec.mem_base,
            mem_size: spec.mem_size,
        })
    }
}

/// A VM fd.
#[derive(Debug)]
pub struct S2pinVm {
    fd: File,
    run_size: usize,
}

impl S2pinVm {
    /// The fd (to pass to another process, or close early, in the hostile tests).
    #[must_use]
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Gives up the VM fd (the vCPUs keep the VM alive).
    pub fn close(self) {
        drop(self.fd);
    }

    /// `SET_USER_MEMORY_REGION` with a raw argument.
    pub fn set_region_raw(&self, r: &S2pinUserspaceMemoryRegion) -> DeviceResult<()> {
        // SAFETY: a live #[repr(C)] argument of the encoded size; read only.
        let rc = unsafe { ioctl_with_ref(&self.fd, S2PIN_SET_USER_MEMORY_REGION.into(), r) };
        check("S2PIN_SET_USER_MEMORY_REGION", rc).map(|_| ())
    }

    /// `CREATE_VCPU` with a raw argument.
    pub fn create_vcpu_raw(&self, arg: &S2pinCreateVcpu) -> DeviceResult<S2pinVcpu> {
        // SAFETY: a live #[repr(C)] argument of the encoded size; read only.
        let rc = unsafe { ioctl_with_ref(&self.fd, S2PIN_CREATE_VCPU.into(), arg) };
        S2pinVcpu::new(owned("S2PIN_CREATE_VCPU", rc)?, self.run_size)
    }
}

impl Vm for S2pinVm {
    type Vcpu = S2pinVcpu;

    fn set_user_memory_region(&self, r: &Region) -> DeviceResult<()> {
        self.set_region_raw(&S2pinUserspaceMemoryRegion {
            slot: r.slot,
            flags: if r.readonly { S2PIN_MEM_READONLY } else { 0 },
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: r.userspace_addr,
        })
    }

    fn create_vcpu(&self, index: u32, start: VcpuStart) -> DeviceResult<S2pinVcpu> {
        let (flags, entry, x0) = match start {
            VcpuStart::On { entry, x0 } => (0, entry, x0),
            VcpuStart::Off => (S2PIN_VCPU_START_OFF, 0, 0),
        };
        self.create_vcpu_raw(&S2pinCreateVcpu {
            index,
            flags,
            entry,
            x0,
        })
    }

    fn stats(&self) -> DeviceResult<S2pinVmStats> {
        let mut s = S2pinVmStats::default();
        // SAFETY: a live #[repr(C)] struct of the encoded size that the
        // kernel fills.
        let rc = unsafe { ioctl_with_mut_ref(&self.fd, S2PIN_GET_STATS.into(), &mut s) };
        check("S2PIN_GET_STATS", rc).map(|_| s)
    }
}

/// A vCPU fd and its mapped run structure.
#[derive(Debug)]
pub struct S2pinVcpu {
    fd: File,
    run: NonNull<S2pinRun>,
    size: usize,
}

// SAFETY: the run mapping belongs to this value alone (one thread runs a
// vCPU at a time; the kernel writes the page only during that thread's RUN).
unsafe impl Send for S2pinVcpu {}

impl S2pinVcpu {
    fn new(fd: File, size: usize) -> DeviceResult<Self> {
        // SAFETY: maps the vCPU fd's run page, shared with the kernel; checked.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DeviceError::last("mmap of the vCPU fd"));
        }
        let run = NonNull::new(p.cast::<S2pinRun>()).ok_or(DeviceError {
            call: "mmap of the vCPU fd",
            err: std::io::Error::other("NULL mapping"),
        })?;
        Ok(Self { fd, run, size })
    }

    /// The vCPU fd (hostile tests).
    #[must_use]
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `RUN` once, raw: the return code and errno.
    pub fn run_raw(&self) -> Result<(), std::io::Error> {
        // SAFETY: an ioctl without argument on our own fd; the kernel writes
        // the run page we mapped.
        let rc = unsafe { ioctl(&self.fd, S2PIN_RUN.into()) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Vcpu for S2pinVcpu {
    fn run(&mut self) -> DeviceResult<Exit> {
        match self.run_raw() {
            Ok(()) => {
                // SAFETY: the page is mapped for our lifetime; the kernel
                // wrote it before RUN returned and does not touch it until
                // the next RUN of this thread.
                let run = unsafe { self.run.as_ptr().read_volatile() };
                Ok(run.decode())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(Exit::Intr),
            Err(err) => Err(DeviceError {
                call: "S2PIN_RUN",
                err,
            }),
        }
    }

    fn complete_mmio_read(&mut self, data: u64) {
        // SAFETY: as in `run`; the kernel reads the word at the next RUN.
        unsafe {
            let mut run = self.run.as_ptr().read_volatile();
            run.set_mmio_read_data(data);
            self.run.as_ptr().write_volatile(run);
        }
    }
}

impl Drop for S2pinVcpu {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `size` bytes, unmapped once.
        unsafe { libc::munmap(self.run.as_ptr().cast(), self.size) };
    }
}
