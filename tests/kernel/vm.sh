#!/bin/bash
# vm.sh CMD...  Run CMD as root in a throwaway QEMU VM booting the Debian
# kernel from /boot (modules from /lib/modules), wireguard already loaded; exit with
# CMD's status. One argument = a shell command line (bash -c); several = an argv.
# The guest sees the host's / (incl. /tmp) read-only under a throwaway tmpfs overlay,
# a fresh /run, $PWD shared read-write, the host's environment, and no network
# device. CMD's stdout+stderr (merged) stream to stdout; the guest console
# is printed to stderr only on failure. Exit: CMD's status, 124 timeout, 125 VM error.
# Env: WGVM_TIMEOUT (s, 600)  WGVM_MEM (MiB, 1024)  WGVM_CPUS (1; >1 can oops at boot
# under TCG)  WGVM_KVER (default: newest /boot kernel with a wireguard module)
# WGVM_ACCEL (tcg; kvm only where /dev/kvm runs stock kernels)  WGVM_DEBUG=1.
# Debian packages: qemu-system-x86 busybox-static cpio xz-utils zstd kmod. Root only.
set -euo pipefail
die() { echo "kernel-wg-vm: $*" >&2; exit 125; }
[ $# -ge 1 ] || die "usage: $0 CMD [ARG...]"
[ "$(id -u)" = 0 ] || die "must run as root"
KVER=${WGVM_KVER:-$(for d in /lib/modules/*/kernel/drivers/net/wireguard; do
  v=${d#/lib/modules/}; v=${v%%/*}; [ -e "/boot/vmlinuz-$v" ] && echo "$v"; done | sort -V | tail -n1)}
[ -n "$KVER" ] && [ -e "/boot/vmlinuz-$KVER" ] || die "no /boot/vmlinuz-* with a wireguard module"
BB=$(command -v busybox) || die "no busybox (apt-get install busybox-static)"
! ldd "$BB" >/dev/null 2>&1 || die "$BB is dynamic (apt-get install busybox-static)"

T=$(mktemp -d /tmp/kernel-wg-vm.XXXXXX) QPID=
cleanup() { [ -z "$QPID" ] || kill "$QPID" 2>/dev/null || true; wait; rm -rf "$T"; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# Kernel: the ELF inside the bzImage boots via PVH and skips the ~2 s zstd
# decompression that TCG makes slow; fall back to the bzImage itself.
K=/boot/vmlinuz-$KVER
off=$(LC_ALL=C grep -abo $'\x28\xb5\x2f\xfd' "$K" | head -n1 | cut -d: -f1) || true
if [ -n "$off" ] && { tail -c "+$((off + 1))" "$K" | zstd -dcq >"$T/vmlinux" 2>/dev/null
     [ "$(head -c4 "$T/vmlinux")" = $'\x7fELF' ]; }; then K=$T/vmlinux; fi

# initramfs: static busybox, the 9p/overlay/wireguard modules (deps first), stage 1.
R=$T/root n=0
mkdir -p "$R"/{bin,dev,proc,sys,m,new,lower,rw} && cp "$BB" "$R/bin/busybox"
for ko in $(for m in 9p 9pnet_virtio overlay wireguard; do modprobe -S "$KVER" --show-depends "$m"
            done | awk '$1 == "insmod" && !seen[$2]++ {print $2}'); do
  n=$((n + 1)); xz -dcf "$ko" >"$R/m/$(printf %02d $n)-$(basename "${ko%.xz}")"
done
cat >"$R/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin; [ -n "$WGVM_DEBUG" ] && set -x
mount -t devtmpfs dev /dev; exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc; mount -t sysfs sys /sys
for m in /m/*.ko; do insmod "$m" || echo "wgvm: insmod $m failed"; done
ip link set lo up
mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=262144 wgvm_root /lower &&
  mount -t tmpfs -o mode=755 rw /rw && mkdir /rw/u /rw/w &&
  mount -t overlay -o lowerdir=/lower,upperdir=/rw/u,workdir=/rw/w root /new ||
  { echo "wgvm: cannot mount the root"; poweroff -f; }
mount -t tmpfs -o mode=755 run /new/run   # fresh /run: no host sockets or netns files
mkdir -p /new/run/wgvm && cp /cmd.sh /stage2.sh /new/run/wgvm/
cwd=$(cat /cwd); [ "$cwd" = / ] || { mkdir -p "/new$cwd" &&
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 wgvm_cwd "/new$cwd"; }
for d in dev proc sys; do mount --move "/$d" "/new/$d"; done
exec switch_root /new /bin/bash /run/wgvm/stage2.sh
EOF
cat >"$R/stage2.sh" <<'EOF'
# Stage 2, PID 1 on the host's root (so module autoloading works): run the
# command, send its status over the "status" port, power off.
[ -n "$WGVM_DEBUG" ] && set -x
port() { local p n; for p in /sys/class/virtio-ports/*; do   # builtins only: exec is slow
  read -r n <"$p/name"; [ "$n" = "$1" ] && echo "/dev/${p##*/}"; done; }
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs shm /dev/shm
[ -d /sys/module/wireguard ] || modprobe wireguard || echo "wgvm: no wireguard" >&2
(set +x; . /run/wgvm/cmd.sh) </dev/null >"$(port out)" 2>&1
echo $? >"$(port status)"
echo o >/proc/sysrq-trigger; sleep 30
EOF
chmod +x "$R/init"
pwd >"$R/cwd"
{ export -p | grep -Ev '^declare -x (PWD|OLDPWD|SHLVL|_)='
  printf 'cd %q || exit 125\n' "$PWD"
  if [ $# -eq 1 ]; then printf '%s\n' "$1"; else printf '%q ' "$@"; echo; fi
} >"$R/cmd.sh"
(cd "$R" && find . | cpio -o -H newc --quiet) >"$T/initrd" || die "cpio failed"

mkfifo "$T/stdin"  # qemu's stdin: opened read-write it never hits EOF (EOF closes the port)
CWD_SHARE=(); [ "$PWD" = / ] ||
  CWD_SHARE=(-virtfs "local,path=${PWD//,/,,},mount_tag=wgvm_cwd,security_model=none,multidevs=remap")
timeout -k 5 "${WGVM_TIMEOUT:-600}" qemu-system-x86_64 -M q35 -accel "${WGVM_ACCEL:-tcg}" \
  -cpu max -smp "${WGVM_CPUS:-1}" -m "${WGVM_MEM:-1024}" -nodefaults -no-reboot \
  -display none -monitor none -serial "file:$T/console.log" \
  -kernel "$K" -initrd "$T/initrd" \
  -append "console=ttyS0 ${WGVM_DEBUG:+ignore_}quiet panic=-1 rdinit=/init ${WGVM_DEBUG:+WGVM_DEBUG=1}" \
  -virtfs local,path=/,mount_tag=wgvm_root,security_model=none,readonly=on,multidevs=remap \
  "${CWD_SHARE[@]}" -device virtio-serial-pci \
  -chardev stdio,id=out,signal=off -device virtserialport,chardev=out,name=out \
  -chardev "file,id=st,path=$T/status" -device virtserialport,chardev=st,name=status \
  0<>"$T/stdin" &
QPID=$!
rc=0; wait "$QPID" || rc=$?; QPID=
status=$(tr -dc 0-9 <"$T/status" 2>/dev/null) || true
[ -z "${WGVM_DEBUG:-}" ] || cat "$T/console.log" >&2
[ -z "$status" ] || exit "$status"
echo "kernel-wg-vm: no exit status from the VM (qemu rc=$rc); guest console:" >&2
tail -n 40 "$T/console.log" >&2 || true
case $rc in 124|137) exit 124;; *) exit 125;; esac
