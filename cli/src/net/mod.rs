//! Host-side networking for nvmm guests. [`forward`] makes a guest reachable from the host through
//! forwarded host ports (`nvmm ssh`, `nvmm run --forward`), in userspace: no iptables or nft
//! rules to install, to clean up after a crash, or to need root for.

pub mod addr;
pub mod forward;
pub mod host;
pub mod netlink;
