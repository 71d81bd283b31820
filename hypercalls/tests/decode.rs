//! Decoding errors, one case at a time (`docs/ABI.md` §2.2, §2.4).

use hypercalls::{
    hyp_fn, ConsoleBytes, GuestCall, GuestFunction, HostFunction, HypError, Hypercall, IpaBits,
    PageCount, Pfn, Prot, Reply, ReplyError, VmHandle, MAX_PAGES_PER_CALL, PFN_BITS,
    TEARDOWN_BATCH,
};
use hypercalls::{Gfn, Regs};

const VM: u64 = 0x0001_0002; // slot 2, generation 1
const EINVAL: Result<Hypercall, HypError> = Err(HypError::InvalidArgument);

fn regs(f: HostFunction, args: &[u64]) -> Regs {
    let mut r = [0; 8];
    r[0] = u64::from(f.id());
    r[1..=args.len()].copy_from_slice(args);
    r
}

fn decode(f: HostFunction, args: &[u64]) -> Result<Hypercall, HypError> {
    Hypercall::decode(&regs(f, args))
}

#[test]
fn unknown_ids_are_not_supported() {
    for x0 in [
        0,
        1,
        0x8400_0000,
        0x8600_0000,
        0xC600_0002,
        0xC600_00FF,
        0xC500_0000,
        0xC700_0000,
        0x4600_0000,
    ] {
        assert_eq!(
            Hypercall::decode(&[x0, 0, 0, 0, 0, 0, 0, 0]),
            Err(HypError::NotSupported),
            "{x0:#x}"
        );
    }
    // An id with bits 63:32 set is not an id of this ABI.
    assert_eq!(
        Hypercall::decode(&[0x1_C600_0000, 0, 0, 0, 0, 0, 0, 0]),
        Err(HypError::NotSupported)
    );
    // Guest ids are not host calls and vice versa.
    assert_eq!(decode(HostFunction::Version, &[]), Ok(Hypercall::Version));
    let guest = u64::from(GuestFunction::Shutdown.id());
    assert_eq!(
        Hypercall::decode(&[guest, 0, 0, 0, 0, 0, 0, 0]),
        Err(HypError::NotSupported)
    );
    assert_eq!(
        GuestCall::decode(&regs(HostFunction::Version, &[])),
        Err(HypError::NotSupported)
    );
    assert_eq!(HypError::NotSupported.to_i64(), -1);
}

#[test]
fn function_ids_are_the_documented_values() {
    assert_eq!(HostFunction::Version.id(), 0xC600_0000);
    assert_eq!(HostFunction::Share.id(), 0xC600_0030);
    assert_eq!(HostFunction::TeardownReclaim.id(), 0xC600_0051);
    assert_eq!(HostFunction::UnshareRange.id(), 0xC600_0034);
    assert_eq!(GuestFunction::ConsoleWrite.id(), 0xC600_0101);
    assert_eq!(hyp_fn(0x42), 0xC600_0042);
}

#[test]
fn page_counts() {
    let ok = decode(
        HostFunction::WrProtect,
        &[VM, 7, u64::from(MAX_PAGES_PER_CALL)],
    );
    assert!(matches!(ok, Ok(Hypercall::WrProtect { nr, .. }) if nr == PageCount::MAX));
    assert_eq!(decode(HostFunction::WrProtect, &[VM, 7, 0]), EINVAL);
    assert_eq!(
        decode(HostFunction::WrProtect, &[VM, 7, 513]),
        Err(HypError::TooBig)
    );
    assert_eq!(
        decode(HostFunction::WrProtect, &[VM, 7, u64::MAX]),
        Err(HypError::TooBig)
    );
    assert_eq!(
        decode(HostFunction::WrProtect, &[VM, 7, 1 << 32]),
        Err(HypError::TooBig)
    );
}

#[test]
fn unshare_range_decodes_like_the_other_gfn_range_calls() {
    let ok = decode(HostFunction::UnshareRange, &[VM, 7, 512]);
    assert!(matches!(
        ok,
        Ok(Hypercall::UnshareRange { gfn, nr, .. }) if gfn.raw() == 7 && nr == PageCount::MAX
    ));
    assert_eq!(decode(HostFunction::UnshareRange, &[VM, 7, 0]), EINVAL);
    assert_eq!(
        decode(HostFunction::UnshareRange, &[VM, 7, 513]),
        Err(HypError::TooBig)
    );
    assert_eq!(
        decode(HostFunction::UnshareRange, &[VM, 1 << 40, 1]),
        EINVAL
    );
    assert_eq!(decode(HostFunction::UnshareRange, &[VM, 7, 1, 9]), EINVAL);
    let call = Hypercall::UnshareRange {
        vm: VmHandle::from_raw(VM as u32).unwrap(),
        gfn: Gfn::new(7).unwrap(),
        nr: PageCount::new(4).unwrap(),
    };
    assert_eq!(
        call.decode_reply(&[0, 4, 0, 0, 0, 0, 0, 0]),
        Ok(Reply::Unshared { pages: 4 })
    );
    assert_eq!(
        call.decode_reply(&[0, 5, 0, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "more pages than asked"
    );
}

#[test]
fn vm_handles() {
    assert_eq!(
        decode(HostFunction::TeardownStart, &[0]),
        EINVAL,
        "0 is never a handle"
    );
    assert_eq!(
        decode(HostFunction::TeardownStart, &[0xFFFF]),
        EINVAL,
        "generation 0"
    );
    assert_eq!(
        decode(HostFunction::TeardownStart, &[1 << 32 | VM]),
        EINVAL,
        "bits 63:32 reserved"
    );
    assert_eq!(
        decode(HostFunction::TeardownStart, &[VM]),
        Ok(Hypercall::TeardownStart {
            vm: VmHandle::new(2, 1).unwrap()
        })
    );
}

#[test]
fn frame_numbers() {
    let max = (1u64 << PFN_BITS) - 1;
    assert!(decode(HostFunction::HostPageState, &[max]).is_ok());
    assert_eq!(decode(HostFunction::HostPageState, &[max + 1]), EINVAL);
    assert_eq!(decode(HostFunction::GuestPageState, &[VM, 1 << 63]), EINVAL);
}

#[test]
fn prot_rules() {
    let share = |prot| decode(HostFunction::Share, &[VM, 1, 2, 3, prot]);
    assert!(matches!(
        share(Prot::RW.bits()),
        Ok(Hypercall::Share { prot: Prot::RW, .. })
    ));
    assert_eq!(share(Prot::W.bits()), EINVAL, "share must grant R");
    assert_eq!(share(0), EINVAL);
    assert_eq!(share(8 | 1), EINVAL, "reserved prot bit");
    let donate = |prot| decode(HostFunction::Donate, &[VM, 1, 2, 3, prot]);
    assert_eq!(donate(Prot::X.bits()), EINVAL);
    assert!(donate(Prot::RWX.bits()).is_ok());
    let relax = |prot| decode(HostFunction::RelaxPerms, &[VM, 2, prot]);
    assert_eq!(relax(0), EINVAL, "relaxing nothing");
    assert!(matches!(
        relax(Prot::X.bits()),
        Ok(Hypercall::RelaxPerms { prot: Prot::X, .. })
    ));
}

#[test]
fn vm_create_arguments() {
    let create = |bits, n, root| decode(HostFunction::VmCreate, &[bits, n, root]);
    let ok = create(40, 4, 0x8_0000);
    assert_eq!(
        ok,
        Ok(Hypercall::VmCreate {
            ipa_bits: IpaBits::new(40).unwrap(),
            nr_vcpus: hypercalls::VcpuCount::new(4).unwrap(),
            root: Pfn::new(0x8_0000).unwrap(),
            memory: None,
        })
    );
    let mem = |g, n| decode(HostFunction::VmCreate, &[32, 1, 0x8_0000, g, n]);
    assert!(mem(0xC_0000, 0x4_0000).is_ok(), "RAM up to the IPA limit");
    assert_eq!(mem(0xC_0000, 0x4_0001), EINVAL, "RAM beyond 4 GiB");
    assert_eq!(mem(5, 0), EINVAL, "a base without pages");
    assert_eq!(mem(u64::MAX, 1), EINVAL, "gfn beyond 40 bits");
    assert_eq!(create(31, 4, 0), EINVAL);
    assert_eq!(create(49, 4, 0), EINVAL);
    assert_eq!(create(40, 0, 0), EINVAL);
    assert_eq!(create(40, 65, 0), EINVAL);
    // ipa_bits 40 needs 2 concatenated root pages: the root must be 2-page aligned.
    assert_eq!(create(40, 1, 0x8_0001), EINVAL);
    assert!(
        create(48, 1, 0x8_0001).is_ok(),
        "one root page needs no alignment"
    );
    assert_eq!(create(34, 1, 0x8_0008), EINVAL, "16 root pages");
    assert!(create(34, 1, 0x8_0010).is_ok());
}

#[test]
fn other_arguments() {
    assert_eq!(
        decode(HostFunction::VcpuRun, &[VM, 64]),
        EINVAL,
        "vcpu index >= MAX_VCPUS"
    );
    assert!(decode(HostFunction::VcpuRun, &[VM, 63]).is_ok());
    assert!(
        decode(HostFunction::VcpuRun, &[VM, 0, u64::MAX]).is_ok(),
        "x3 is MMIO data"
    );
    let vcpu = |x3, x4, x5| decode(HostFunction::VcpuCreate, &[VM, 0, x3, x4, x5]);
    assert!(vcpu(0x4008_0000, u64::MAX, 0).is_ok());
    assert_eq!(vcpu(0x4008_0002, 0, 0), EINVAL, "misaligned entry");
    assert_eq!(vcpu(1 << 52, 0, 0), EINVAL, "entry beyond 52 bits");
    assert!(vcpu(0, 0, 1).is_ok(), "powered off");
    assert_eq!(vcpu(4, 0, 1), EINVAL, "powered off with an entry");
    assert_eq!(vcpu(0, 1, 1), EINVAL, "powered off with an x0");
    assert_eq!(vcpu(0, 0, 2), EINVAL, "unknown flag");
    assert_eq!(
        decode(HostFunction::VmCounters, &[VM, 2]),
        EINVAL,
        "no counter group 2"
    );
    assert_eq!(decode(HostFunction::Features, &[1 << 32]), EINVAL);
    assert_eq!(
        decode(HostFunction::Features, &[0xDEAD_BEEF]),
        Ok(Hypercall::Features { func: 0xDEAD_BEEF }),
        "any 32-bit id may be asked about"
    );
}

#[test]
fn the_first_bad_register_decides() {
    // x2 (pfn) bad and x4 (count) too big: x2 wins.
    assert_eq!(
        decode(HostFunction::Share, &[VM, 1 << 50, 0, 513, 1]),
        EINVAL
    );
    // x4 too big and x5 bad: x4 wins.
    assert_eq!(
        decode(HostFunction::Share, &[VM, 0, 0, 513, 99]),
        Err(HypError::TooBig)
    );
    // A too-big count and a junk unused register: the count wins.
    assert_eq!(
        decode(HostFunction::WrProtect, &[VM, 0, 600, 0, 0, 0, 9]),
        Err(HypError::TooBig)
    );
}

#[test]
fn guest_calls() {
    let write = |args: &[u64]| {
        let mut r = [0u64; 8];
        r[0] = u64::from(GuestFunction::ConsoleWrite.id());
        r[1..=args.len()].copy_from_slice(args);
        GuestCall::decode(&r)
    };
    let hello = u64::from_le_bytes(*b"hello\0\0\0");
    assert_eq!(
        write(&[5, hello, 0]),
        Ok(GuestCall::ConsoleWrite(
            ConsoleBytes::new(b"hello").unwrap()
        ))
    );
    assert_eq!(
        write(&[4, hello, 0]),
        Err(HypError::InvalidArgument),
        "byte beyond len"
    );
    assert_eq!(
        write(&[0, 0, 0]),
        Err(HypError::InvalidArgument),
        "empty write"
    );
    assert_eq!(write(&[17, 0, 0]), Err(HypError::InvalidArgument));
    assert_eq!(
        write(&[16, u64::MAX, u64::MAX]).map(|c| c.encode()[3]),
        Ok(u64::MAX)
    );
    let mut r = [0u64; 8];
    r[0] = u64::from(GuestFunction::ShareRequest.id());
    r[1] = 0x100;
    r[2] = 1000;
    assert_eq!(GuestCall::decode(&r), Err(HypError::TooBig));
    r[2] = 2;
    assert_eq!(
        GuestCall::decode(&r),
        Ok(GuestCall::ShareRequest {
            gfn: Gfn::new(0x100).unwrap(),
            nr: PageCount::new(2).unwrap()
        })
    );
}

#[test]
fn malformed_replies() {
    let vm = VmHandle::new(2, 1).unwrap();
    let nr = PageCount::new(4).unwrap();
    let wp = Hypercall::WrProtect {
        vm,
        gfn: Gfn::new(0).unwrap(),
        nr,
    };
    assert_eq!(
        wp.decode_reply(&[0, 4, 0, 0, 0, 0, 0, 0]),
        Ok(Reply::WrProtected { pages: 4 })
    );
    assert_eq!(
        wp.decode_reply(&[0, 5, 0, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "more pages than asked"
    );
    assert_eq!(
        wp.decode_reply(&[1, 0, 0, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "positive x0"
    );
    assert_eq!(
        wp.decode_reply(&[0, 1, 0, 0, 0, 0, 0, 1]),
        Err(ReplyError::Malformed),
        "junk in x7"
    );
    let einval = (-22i64) as u64;
    assert_eq!(
        wp.decode_reply(&[einval, 0, 0, 0, 0, 0, 0, 0]),
        Err(ReplyError::Failed(HypError::InvalidArgument))
    );
    assert_eq!(
        wp.decode_reply(&[einval, 1, 0, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "error with payload"
    );

    let td = Hypercall::TeardownReclaim { vm };
    let batch = u64::from(TEARDOWN_BATCH);
    assert!(td.decode_reply(&[0, batch, 1, 0, 0, 0, 0, 0]).is_ok());
    assert_eq!(
        td.decode_reply(&[0, batch + 1, 1, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed)
    );
    assert_eq!(
        td.decode_reply(&[0, 3, 2, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "more is 0 or 1"
    );

    let hp = Hypercall::HostPageState {
        pfn: Pfn::new(1).unwrap(),
    };
    assert_eq!(
        hp.decode_reply(&[0, 0, 5, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "host owner with a VM"
    );
    assert_eq!(
        hp.decode_reply(&[0, 2, 0, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "VM owner without one"
    );
    assert_eq!(
        hp.decode_reply(&[0, 3, 0, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "owner kind 3"
    );

    let gp = Hypercall::GuestPageState {
        vm,
        gfn: Gfn::new(1).unwrap(),
    };
    assert_eq!(
        gp.decode_reply(&[0, 0, 7, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "unmapped with a pfn"
    );
    assert_eq!(
        gp.decode_reply(&[0, 4, 7, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "state 4"
    );

    let mr = Hypercall::MemcacheReclaim { vm };
    assert_eq!(
        mr.decode_reply(&[0, 7, 1, 2, 3, 4, 5, 6]),
        Err(ReplyError::Malformed),
        "more than 6 pfns"
    );
    assert_eq!(
        mr.decode_reply(&[0, 1, 9, 3, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "pfn beyond count"
    );
    let got = mr.decode_reply(&[0, 2, 9, 3, 0, 0, 0, 0]);
    assert!(
        matches!(got, Ok(Reply::MemcacheReclaimed(p)) if p.as_slice() == [Pfn::new(9).unwrap(), Pfn::new(3).unwrap()])
    );

    let run = Hypercall::VcpuRun {
        vm,
        vcpu: hypercalls::VcpuIndex::new(0).unwrap(),
        mmio_data: 0,
    };
    assert_eq!(
        run.decode_reply(&[0, 11, 0, 0, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "exit reason 11"
    );
    assert_eq!(
        run.decode_reply(&[0, 7, 0x900_0000, 2, 1, 0x1_0000, 0, 0]),
        Err(ReplyError::Malformed),
        "MMIO data wider than the access"
    );
    assert_eq!(
        run.decode_reply(&[0, 7, 0x900_0000, 3, 1, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "MMIO size 3"
    );
    assert_eq!(
        run.decode_reply(&[0, 7, 0x900_0000, 4, 0, 5, 0, 0]),
        Err(ReplyError::Malformed),
        "MMIO read with data"
    );
    assert_eq!(
        run.decode_reply(&[0, 1, 5, 1, 2, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "fault kind 2"
    );
    assert_eq!(
        run.decode_reply(&[0, 1, 5, 3, 0, 0, 0, 0]),
        Err(ReplyError::Malformed),
        "access 3"
    );
}
