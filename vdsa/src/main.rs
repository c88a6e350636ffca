//! `vdsa`: the appliance daemon (see `vdsa::daemon`).

fn main() -> anyhow::Result<()> {
    vdsa::daemon::main(std::env::args())
}
