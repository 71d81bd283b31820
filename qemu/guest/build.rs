//! Links the guest payload at the boot contract's GUEST_IMAGE_IPA, for the
//! bare-metal target only (`baremetal::build`).
fn main() {
    baremetal::build::link(
        "GUEST_IMAGE_IPA",
        boot_contract::GUEST_IMAGE_IPA,
        baremetal::build::Targets::Bins,
    );
}
