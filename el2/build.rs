//! Links the EL2 image at the boot contract's HYP_IMAGE_ADDR, for the
//! bare-metal target only (`baremetal::build`).
fn main() {
    baremetal::build::link(
        "HYP_IMAGE_ADDR",
        boot_contract::HYP_IMAGE_ADDR,
        baremetal::build::Targets::All,
    );
}
