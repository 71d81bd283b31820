//! Links the test host at the boot contract's HOST_KERNEL_ADDR, for the
//! bare-metal target only (`baremetal::build`).
fn main() {
    baremetal::build::link(
        "HOST_KERNEL_ADDR",
        boot_contract::HOST_KERNEL_ADDR,
        baremetal::build::Targets::Bins,
    );
}
