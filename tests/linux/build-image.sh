#!/usr/bin/env bash
# Build the Linux-guest test fixture: a Debian kernel (bzImage and ELF vmlinux) and a busybox
# initramfs whose /init prints a marker and powers off. See `-h`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tests/linux/build-image.sh [-h] [OUTDIR]

Builds the Linux-guest test fixture from pinned Debian packages, without installing them:
  OUTDIR/bzImage            the Debian kernel (vmlinuz), as shipped
  OUTDIR/vmlinux            the ELF kernel, extracted from the bzImage's LZ4 payload
  OUTDIR/initramfs.cpio.gz  busybox + virtio modules; /init loads the modules, prints
                            "nvmm-linux: init reached", "nvmm-linux: cpus=N" and
                            "nvmm-linux: vdisks=N", then powers off

OUTDIR defaults to ${NVMM_LINUX_DIR:-target/linux-guest}, taken relative to the repository root
(an OUTDIR argument is relative to the current directory).
Downloaded .debs are kept in OUTDIR/cache. Re-running with everything up to date does nothing.

Environment (package spec is what `apt-get download` takes: NAME or NAME=VERSION):
  NVMM_LINUX_DIR          default OUTDIR
  NVMM_KERNEL_PKG         kernel package      (default: linux-image-6.1.0-56-cloud-amd64=6.1.192-2)
  NVMM_KERNEL_SHA256      its .deb's sha256   (empty: do not check)
  NVMM_BUSYBOX_PKG        busybox package     (default: busybox-static=1:1.35.0-4+deb12u1+b1)
  NVMM_BUSYBOX_SHA256     its .deb's sha256   (empty: do not check)

Needs apt-get, dpkg-deb, cpio, lz4 and gzip; installs cpio/lz4 with apt-get when missing.
EOF
}

# Pinned packages and the sha256 of their .deb files (checked after every download).
# package spec                                       sha256 of the .deb
KERNEL_PKG=${NVMM_KERNEL_PKG-linux-image-6.1.0-56-cloud-amd64=6.1.192-2}
KERNEL_SHA256=${NVMM_KERNEL_SHA256-e7d02b943971edcb8790e256c02cfab3bca6c3d37c1bf25392a57c71300615ee}
BUSYBOX_PKG=${NVMM_BUSYBOX_PKG-busybox-static=1:1.35.0-4+deb12u1+b1}
BUSYBOX_SHA256=${NVMM_BUSYBOX_SHA256-3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744}

# Modules copied into the initramfs, in load order (Debian ships them as =m; no modules.dep).
MODULES=(virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net virtio_console)
# Busybox applets linked into /bin.
APPLETS=(sh ash cat dmesg echo grep insmod ip ls lsmod mkdir mount poweroff reboot sleep umount)

die() { echo "build-image: error: $*" >&2; exit 1; }
log() { echo "build-image: $*" >&2; }

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [[ -z ${OUTARG:-} ]] || die "more than one OUTDIR given"; OUTARG=$1 ;;
    esac
    shift
done

# An OUTDIR argument is taken relative to the current directory, the default to the repo root.
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -n ${OUTARG:-} ]]; then
    out=$(realpath -m "$OUTARG")
else
    out=${NVMM_LINUX_DIR:-target/linux-guest}
    [[ $out = /* ]] || out=$repo_root/$out
fi
cache=$out/cache

# Everything the outputs depend on; when it matches the stamp, there is nothing to do.
config="$KERNEL_PKG $KERNEL_SHA256 $BUSYBOX_PKG $BUSYBOX_SHA256 ${MODULES[*]} ${APPLETS[*]}"
config+=" $(sha256sum < "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
stamp=$out/.stamp
if [[ -f $out/bzImage && -f $out/vmlinux && -f $out/initramfs.cpio.gz && -f $stamp ]] &&
    [[ $(<"$stamp") == "$config" ]]; then
    log "up to date"
    printf '%s\n' "$out/bzImage" "$out/vmlinux" "$out/initramfs.cpio.gz"
    exit 0
fi

apt_install() {
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o DPkg::Lock::Timeout=120 "$@" >&2 ||
        die "could not install $* (run as root, or install them yourself)"
}
missing=()
command -v cpio >/dev/null || missing+=(cpio)
command -v lz4 >/dev/null || missing+=(lz4)
[[ ${#missing[@]} -eq 0 ]] || apt_install "${missing[@]}"
for tool in apt-get dpkg-deb gzip sha256sum od; do
    command -v "$tool" >/dev/null || die "$tool not found (this script expects Debian 12)"
done

# fetch SPEC SHA256 DEST: download SPEC's .deb to DEST (unless a copy with that hash is there).
fetch() {
    local spec=$1 sha=$2 dest=$3 dl got
    if [[ -f $dest && -n $sha ]] && [[ $(sha256sum < "$dest" | cut -d' ' -f1) == "$sha" ]]; then
        return
    fi
    dl=$(mktemp -d "$cache/dl.XXXXXX")
    tmpdirs+=("$dl")
    # As root, apt would drop to _apt, which cannot write the private download directory.
    local opts=(-q)
    [[ $EUID -ne 0 ]] || opts+=(-o APT::Sandbox::User=root)
    log "downloading $spec"
    if ! (cd "$dl" && apt-get download "${opts[@]}" "$spec" >&2); then
        log "apt-get download failed; running apt-get update and retrying"
        apt-get update -q >&2 || die "apt-get update failed"
        (cd "$dl" && apt-get download "${opts[@]}" "$spec" >&2) ||
            die "apt-get download $spec failed (is that version still in the archive? override with NVMM_*_PKG/NVMM_*_SHA256)"
    fi
    shopt -s nullglob
    local debs=("$dl"/*.deb)
    shopt -u nullglob
    [[ ${#debs[@]} -eq 1 ]] || die "expected one .deb for $spec, got ${#debs[@]}"
    got=$(sha256sum < "${debs[0]}" | cut -d' ' -f1)
    if [[ -z $sha ]]; then
        log "warning: no sha256 pinned for $spec; got $got"
    elif [[ $got != "$sha" ]]; then
        die "sha256 mismatch for $spec: expected $sha, got $got (a changed package? set NVMM_*_SHA256 to accept it)"
    fi
    mv "${debs[0]}" "$dest"
}

# Scratch directories, removed on every exit path.
tmpdirs=()
trap 'rm -rf "${tmpdirs[@]}"' EXIT
mkdir -p "$cache"
fetch "$KERNEL_PKG" "$KERNEL_SHA256" "$cache/kernel.deb"
fetch "$BUSYBOX_PKG" "$BUSYBOX_SHA256" "$cache/busybox.deb"

work=$(mktemp -d "$out/work.XXXXXX")
tmpdirs+=("$work")
dpkg-deb -x "$cache/kernel.deb" "$work/kernel"
dpkg-deb -x "$cache/busybox.deb" "$work/busybox"

# --- bzImage and vmlinux ---------------------------------------------------------------------
shopt -s nullglob
vmlinuzes=("$work"/kernel/boot/vmlinuz-*)
moddirs=("$work"/kernel/lib/modules/*/)
shopt -u nullglob
[[ ${#vmlinuzes[@]} -eq 1 ]] || die "expected one /boot/vmlinuz-* in the kernel package"
[[ ${#moddirs[@]} -eq 1 ]] || die "expected one /lib/modules/* in the kernel package"
bzimage=${vmlinuzes[0]}

# read_u32/read_u8 FILE OFFSET: little-endian integers from the boot protocol's setup header.
read_u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
read_u32() { od -An -tu4 --endian=little -j "$2" -N4 "$1" | tr -d ' '; }
[[ $(od -An -c -j $((0x202)) -N4 "$bzimage" | tr -d ' ') == HdrS ]] || die "$bzimage is not a bzImage"
setup_sects=$(read_u8 "$bzimage" $((0x1f1)))
[[ $setup_sects -ne 0 ]] || setup_sects=4
payload_offset=$(read_u32 "$bzimage" $((0x248)))
payload_length=$(read_u32 "$bzimage" $((0x24c)))
# payload_offset is relative to the protected-mode code, which follows the setup sectors.
start=$(((setup_sects + 1) * 512 + payload_offset))
dd if="$bzimage" of="$work/payload" bs=64K iflag=skip_bytes,count_bytes \
    skip="$start" count="$payload_length" status=none
# LZ4 legacy frame magic 0x184c2102; the kernel build appends the decompressed size (u32 LE).
[[ $(od -An -tx4 --endian=little -N4 "$work/payload" | tr -d ' ') == 184c2102 ]] ||
    die "the bzImage payload is not LZ4 (legacy frame); this script only handles LZ4 kernels"
want_size=$(read_u32 "$work/payload" $((payload_length - 4)))
head -c $((payload_length - 4)) "$work/payload" | lz4 -d -q -c > "$work/vmlinux" ||
    die "lz4 could not decompress the bzImage payload"
[[ $(od -An -tx1 -N4 "$work/vmlinux" | tr -d ' ') == 7f454c46 ]] ||
    die "the decompressed payload is not an ELF file"
[[ $(stat -c %s "$work/vmlinux") -eq $want_size ]] ||
    die "decompressed size $(stat -c %s "$work/vmlinux") != recorded size $want_size"

# --- initramfs -------------------------------------------------------------------------------
root=$work/initramfs
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules}
install -m 0755 "$work/busybox/bin/busybox" "$root/bin/busybox"
for applet in "${APPLETS[@]}"; do ln -s busybox "$root/bin/$applet"; done
for mod in "${MODULES[@]}"; do
    ko=$(find "${moddirs[0]}" \( -name "$mod.ko" -o -name "$mod.ko.*" \) -print -quit)
    [[ -n $ko ]] || die "module $mod not found in the kernel package"
    case $ko in
        *.ko) cp "$ko" "$root/lib/modules/$mod.ko" ;;
        *.ko.xz) xz -dc "$ko" > "$root/lib/modules/$mod.ko" ;;
        *.ko.gz) gzip -dc "$ko" > "$root/lib/modules/$mod.ko" ;;
        *.ko.zst) zstd -qdc "$ko" > "$root/lib/modules/$mod.ko" ;;
        *) die "unknown module compression: $ko" ;;
    esac
done
cat > "$root/init" <<EOF
#!/bin/sh
# nvmm Linux test guest: load the virtio modules, print the markers, power off.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in ${MODULES[*]}; do
    insmod /lib/modules/\$m.ko || echo "nvmm-linux: insmod \$m failed"
done
echo "nvmm-linux: init reached"
echo "nvmm-linux: cpus=\$(grep -c ^processor /proc/cpuinfo)"
# Each virtio disk must appear exactly once, however it was announced (cmdline and/or ACPI).
echo "nvmm-linux: vdisks=\$(ls /sys/block | grep -c '^vd')"
poweroff -f
EOF
chmod 0755 "$root/init"
# Fixed timestamps and owners make the archive reproducible.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n > "$work/initramfs.cpio.gz"

# --- install the outputs ---------------------------------------------------------------------
cp "$bzimage" "$work/bzImage"
for f in bzImage vmlinux initramfs.cpio.gz; do mv -f "$work/$f" "$out/$f"; done
printf '%s' "$config" > "$stamp"
log "built from $KERNEL_PKG and $BUSYBOX_PKG"
printf '%s\n' "$out/bzImage" "$out/vmlinux" "$out/initramfs.cpio.gz"
