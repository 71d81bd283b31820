//! SMCCC function identifiers.
//!
//! Every call is an SMCCC *fast call* (bit 31), *SMC64/HVC64* (bit 30), in the
//! *Vendor Specific Hypervisor Service* range (owning entity 6, bits 29:24),
//! with the function number in bits 15:0: `0xC600_0000 | n`.
//! Host calls use numbers `0x0000..=0x00FF`, guest calls `0x0100..=0x01FF`.
//! See `docs/ABI.md` §2.1.

/// Bit 31: fast call.
pub const SMCCC_FAST_CALL: u32 = 1 << 31;
/// Bit 30: SMC64/HVC64 calling convention.
pub const SMCCC_64: u32 = 1 << 30;
/// Shift of the owning-entity field (bits 29:24).
pub const SMCCC_OWNER_SHIFT: u32 = 24;
/// Mask of the owning-entity field, after shifting.
pub const SMCCC_OWNER_MASK: u32 = 0x3F;
/// Owning entity 6: Vendor Specific Hypervisor Service.
pub const SMCCC_OWNER_VENDOR_HYP: u32 = 6;
/// SMCCC v1.3 SVE hint (bit 16): callers may set it; this ABI ignores it.
pub const SMCCC_SVE_HINT: u32 = 1 << 16;
/// Mask of the function-number field (bits 15:0).
pub const SMCCC_FUNC_MASK: u32 = 0xFFFF;
/// The value every function id of this ABI has in bits 31:16.
pub const HYP_FN_BASE: u32 =
    SMCCC_FAST_CALL | SMCCC_64 | (SMCCC_OWNER_VENDOR_HYP << SMCCC_OWNER_SHIFT);

/// SMCCC `NOT_SUPPORTED`: returned in x0 for an unknown function id.
pub const SMCCC_RET_NOT_SUPPORTED: i64 = -1;

/// The function id of vendor-hypervisor function number `n`.
#[must_use]
pub const fn hyp_fn(n: u16) -> u32 {
    HYP_FN_BASE | n as u32
}

/// The function id in a raw x0 with the SMCCC SVE hint bit cleared, or `None`
/// if bits 63:32 of x0 are set (no function id of this ABI has them).
pub(crate) fn canonical_id(x0: u64) -> Option<u32> {
    let id = u32::try_from(x0).ok()? & !SMCCC_SVE_HINT;
    Some(id)
}

macro_rules! functions {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vdoc:meta])* $variant:ident = $num:literal, $cname:literal, $section:literal, $sig:literal; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name {
            $( $(#[$vdoc])* $variant = hyp_fn($num), )*
        }

        impl $name {
            /// Every function, in id order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];

            /// The SMCCC function id (what goes in x0).
            #[must_use]
            pub const fn id(self) -> u32 {
                self as u32
            }

            /// The function for an id, or `None` for an unknown one.
            #[must_use]
            pub const fn from_id(id: u32) -> Option<Self> {
                match id {
                    $( x if x == hyp_fn($num) => Some(Self::$variant), )*
                    _ => None,
                }
            }

            /// The call's name: the C macro and the `docs/ABI.md` heading.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $( Self::$variant => $cname, )*
                }
            }

            /// The number of the call's section in `docs/ABI.md`; its heading
            /// is `## <section> <name>`.
            #[must_use]
            pub const fn doc_section(self) -> &'static str {
                match self {
                    $( Self::$variant => $section, )*
                }
            }

            /// The register signature, `inputs -> outputs`.
            #[must_use]
            pub const fn signature(self) -> &'static str {
                match self {
                    $( Self::$variant => $sig, )*
                }
            }
        }
    };
}

functions! {
    /// The calls the host kernel makes with `HVC #0`.
    pub enum HostFunction {
        /// ABI version.
        Version = 0x0000, "HYP_VERSION", "3.1",
            "-> x1=major x2=minor";
        /// Whether a function id is supported.
        Features = 0x0001, "HYP_FEATURES", "3.2",
            "x1=function_id -> x1=supported(0|1)";
        /// Donate host pages to a VM's page-table memcache.
        MemcacheTopup = 0x0010, "HYP_MEMCACHE_TOPUP", "3.3",
            "x1=vm x2=pfn x3=nr_pages ->";
        /// Take free memcache pages back.
        MemcacheReclaim = 0x0011, "HYP_MEMCACHE_RECLAIM", "3.4",
            "x1=vm -> x1=count x2..x7=pfns";
        /// Create a VM.
        VmCreate = 0x0020, "HYP_VM_CREATE", "3.5",
            "x1=ipa_bits x2=nr_vcpus x3=root_pfn x4=mem_gfn x5=mem_pages -> x1=vm";
        /// Create a vCPU.
        VcpuCreate = 0x0021, "HYP_VCPU_CREATE", "3.6",
            "x1=vm x2=vcpu x3=entry_ipa x4=entry_x0 x5=flags ->";
        /// Run a vCPU until it exits.
        VcpuRun = 0x0022, "HYP_VCPU_RUN", "3.7",
            "x1=vm x2=vcpu x3=mmio_read_data -> x1=exit_reason x2..x5=exit_info";
        /// Share host pages with a guest (the host keeps access).
        Share = 0x0030, "HYP_SHARE", "3.8",
            "x1=vm x2=pfn x3=gfn x4=nr_pages x5=prot ->";
        /// Undo a share.
        Unshare = 0x0031, "HYP_UNSHARE", "3.9",
            "x1=vm x2=pfn x3=gfn x4=nr_pages ->";
        /// Donate host pages to a guest (the host loses access).
        Donate = 0x0032, "HYP_DONATE", "3.10",
            "x1=vm x2=pfn x3=gfn x4=nr_pages x5=prot ->";
        /// Take donated pages back, zeroed.
        Reclaim = 0x0033, "HYP_RECLAIM", "3.11",
            "x1=vm x2=pfn x3=gfn x4=nr_pages ->";
        /// Undo the shares of every mapped guest frame of a range, whatever
        /// frame each maps.
        UnshareRange = 0x0034, "HYP_UNSHARE_RANGE", "3.21",
            "x1=vm x2=gfn x3=nr_pages -> x1=pages_unshared";
        /// Remove write permission from guest mappings.
        WrProtect = 0x0040, "HYP_WRPROTECT", "3.12",
            "x1=vm x2=gfn x3=nr_pages -> x1=pages_changed";
        /// Add permissions to one guest mapping.
        RelaxPerms = 0x0041, "HYP_RELAX_PERMS", "3.13",
            "x1=vm x2=gfn x3=prot ->";
        /// Clear the access flag of guest mappings.
        TestClearYoung = 0x0042, "HYP_TEST_CLEAR_YOUNG", "3.14",
            "x1=vm x2=gfn x3=nr_pages -> x1=young(0|1)";
        /// Start tearing a VM down.
        TeardownStart = 0x0050, "HYP_TEARDOWN_START", "3.15",
            "x1=vm ->";
        /// Reclaim a bounded batch of a dying VM's pages.
        TeardownReclaim = 0x0051, "HYP_TEARDOWN_RECLAIM", "3.16",
            "x1=vm -> x1=reclaimed x2=more(0|1)";
        /// Finish tearing a VM down.
        TeardownFinalize = 0x0052, "HYP_TEARDOWN_FINALIZE", "3.17",
            "x1=vm ->";
        /// Read a group of per-VM counters.
        VmCounters = 0x0060, "HYP_VM_COUNTERS", "3.18",
            "x1=vm x2=group -> x1..x7=counters";
        /// Query the ownership of a host page (tests).
        HostPageState = 0x0070, "HYP_HOST_PAGE_STATE", "3.19",
            "x1=pfn -> x1=owner_kind x2=owner_vm x3=owner_state x4=share_count";
        /// Query a guest page (tests).
        GuestPageState = 0x0071, "HYP_GUEST_PAGE_STATE", "3.20",
            "x1=vm x2=gfn -> x1=state x2=pfn x3=prot";
    }
}

functions! {
    /// The calls a guest makes with `HVC #0` (provisional: see `docs/ABI.md` §4).
    pub enum GuestFunction {
        /// ABI version.
        Version = 0x0100, "HYP_GUEST_VERSION", "4.1",
            "-> x1=major x2=minor";
        /// Write bytes to the console.
        ConsoleWrite = 0x0101, "HYP_GUEST_CONSOLE_WRITE", "4.2",
            "x1=len x2..x3=bytes ->";
        /// Ask the host to share memory.
        ShareRequest = 0x0102, "HYP_GUEST_SHARE_REQUEST", "4.3",
            "x1=gfn x2=nr_pages ->";
        /// Ask the host to unshare memory.
        UnshareRequest = 0x0103, "HYP_GUEST_UNSHARE_REQUEST", "4.4",
            "x1=gfn x2=nr_pages ->";
        /// Stop the VM.
        Shutdown = 0x0104, "HYP_GUEST_SHUTDOWN", "4.5",
            "->";
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_smccc_vendor_hyp_shape() {
        let ids = HostFunction::ALL
            .iter()
            .map(|f| f.id())
            .chain(GuestFunction::ALL.iter().map(|f| f.id()));
        for id in ids {
            assert_eq!(id & SMCCC_FAST_CALL, SMCCC_FAST_CALL, "{id:#x}: fast call");
            assert_eq!(id & SMCCC_64, SMCCC_64, "{id:#x}: SMC64");
            assert_eq!(
                (id >> SMCCC_OWNER_SHIFT) & SMCCC_OWNER_MASK,
                6,
                "{id:#x}: owner"
            );
            assert_eq!(id & 0x00FF_0000, 0, "{id:#x}: bits 23:16 must be zero");
            assert_eq!(id & 0xFFFF_0000, 0xC600_0000, "{id:#x}");
        }
    }

    #[test]
    fn ids_are_unique_and_from_id_inverts_id() {
        let mut seen: [u32; 64] = [0; 64];
        let mut n = 0;
        for f in HostFunction::ALL {
            assert_eq!(HostFunction::from_id(f.id()), Some(*f));
            assert_eq!(
                GuestFunction::from_id(f.id()),
                None,
                "{}: host and guest ranges overlap",
                f.name()
            );
            assert!(f.id() & SMCCC_FUNC_MASK < 0x100, "{}", f.name());
            seen[n] = f.id();
            n += 1;
        }
        for f in GuestFunction::ALL {
            assert_eq!(GuestFunction::from_id(f.id()), Some(*f));
            assert!(
                (0x100..0x200).contains(&(f.id() & SMCCC_FUNC_MASK)),
                "{}",
                f.name()
            );
            seen[n] = f.id();
            n += 1;
        }
        let seen = &mut seen[..n];
        seen.sort_unstable();
        for w in seen.windows(2) {
            assert_ne!(w[0], w[1], "duplicate id {:#x}", w[0]);
        }
    }

    #[test]
    fn doc_sections_are_unique() {
        for (i, a) in HostFunction::ALL.iter().enumerate() {
            for b in &HostFunction::ALL[i + 1..] {
                assert_ne!(a.doc_section(), b.doc_section());
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn canonical_id_drops_only_the_sve_hint() {
        assert_eq!(canonical_id(0xC601_0030), Some(0xC600_0030));
        assert_eq!(canonical_id(0xC600_0030), Some(0xC600_0030));
        assert_eq!(canonical_id(0x1_C600_0030), None);
        assert_eq!(canonical_id(0xC602_0030), Some(0xC602_0030));
    }
}
