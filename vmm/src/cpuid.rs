//! CPUID for each vCPU: what KVM supports, plus this vCPU's APIC ID and topology, minus what
//! the [`CpuidPolicy`] hides.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

use crate::config::CpuidPolicy;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMETERS: u32 = 0x4;
const LEAF_EXTENDED_FEATURES: u32 = 0x7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;

const ECX_CX16: u32 = 1 << 13;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Leaf 7 EBX features that need XSAVE-managed state: AVX2 and the AVX-512 family.
const LEAF7_EBX_XSAVE_DEPENDENT: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Returns the CPUID table for vCPU `index` of `count`: one socket, `count` cores, one thread
/// per core, APIC ID = index.
pub fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8, policy: CpuidPolicy) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        adjust_entry(entry, index, count.max(1), policy);
    }
    cpuid
}

fn adjust_entry(entry: &mut kvm_cpuid_entry2, index: u8, count: u8, policy: CpuidPolicy) {
    let apic_id = u32::from(index);
    let count = u32::from(count);
    // Bits needed to number the cores in the package (x2APIC ID shift at the core level).
    let core_bits = u32::BITS - (count - 1).leading_zeros();
    match entry.function {
        LEAF_FEATURES => {
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
            if policy.hide_cx16 {
                entry.ecx &= !ECX_CX16;
            }
            if policy.hide_xsave {
                entry.ecx &= !(ECX_XSAVE | ECX_OSXSAVE | ECX_AVX);
            }
        }
        LEAF_CACHE_PARAMETERS => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing the cache - 1 (one).
            entry.eax = (entry.eax & 0x0000_3fff) | ((count - 1) << 26);
        }
        LEAF_EXTENDED_FEATURES if entry.index == 0 && policy.hide_xsave => {
            entry.ebx &= !LEAF7_EBX_XSAVE_DEPENDENT;
        }
        LEAF_TOPOLOGY => {
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = count;
                    entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        LEAF_XSAVE if policy.hide_xsave => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn table() -> CpuId {
        CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_CACHE_PARAMETERS, 0),
            entry(LEAF_EXTENDED_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_XSAVE, 0),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn apic_id_and_topology_follow_the_vcpu() {
        let cpuid = vcpu_cpuid(&table(), 3, 4, CpuidPolicy::default());
        let leaf1 = find(&cpuid, LEAF_FEATURES, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.ecx & ECX_CX16, 0, "nothing hidden by default");
        let core = find(&cpuid, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 3));
        assert_eq!(find(&cpuid, LEAF_TOPOLOGY, 2).ebx, 0);
        assert_eq!(find(&cpuid, LEAF_CACHE_PARAMETERS, 0).eax >> 26, 3);
    }

    #[test]
    fn policy_hides_cx16_and_xsave() {
        let policy = CpuidPolicy {
            hide_cx16: true,
            hide_xsave: true,
        };
        let cpuid = vcpu_cpuid(&table(), 0, 1, policy);
        let leaf1 = find(&cpuid, LEAF_FEATURES, 0);
        assert_eq!(
            leaf1.ecx & (ECX_CX16 | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX),
            0
        );
        assert_eq!(leaf1.edx & EDX_HTT, 0, "one vCPU: no HTT");
        assert_eq!(find(&cpuid, LEAF_EXTENDED_FEATURES, 0).ebx & (1 << 5), 0);
        let xsave = find(&cpuid, LEAF_XSAVE, 0);
        assert_eq!((xsave.eax, xsave.ebx, xsave.ecx, xsave.edx), (0, 0, 0, 0));
    }
}
