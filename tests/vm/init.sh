#!/bin/sh
# PID 1 of the test VM (busybox sh from the initramfs). It stacks a tmpfs
# overlay on the host's root (9p, read-only), runs the command the host left
# on the control share inside that root, writes its exit code back to the
# share and powers off. Messages here go to the kernel console (ttyS0);
# the command's output goes to ttyS1, which the host streams.

export PATH=/bin
. /etc/meshbox-vm.conf    # KVER, MODULES_DIR (the cached modules, a host path)

# The host reads this marker to tell a broken setup from a crashed guest.
fail() {
    echo "meshbox-vm: setup failed: $*"
    poweroff -f
}

mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev \
    || fail "mounting proc, sys, dev"
while read -r module; do
    insmod "/modules/$module" || fail "insmod $module"
done </modules/order

p9=trans=virtio,version=9p2000.L,msize=512000
# loose: nothing changes the host root under a short-lived guest; fastest imports.
mount -t 9p -o "$p9,cache=loose,ro" hostroot /lower || fail "mounting the host root (9p)"
# none: the exit code must reach the host before power-off.
mount -t 9p -o "$p9,cache=none" ctl /ctl || fail "mounting the control share (9p)"

mount -t tmpfs -o mode=755 overlay-rw /rw && mkdir /rw/upper /rw/work \
    && mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "mounting the overlay root"

# Fresh kernel filesystems: the host's /proc, /sys, /dev, /run (its
# /run/netns above all) and /tmp must not show through.
r=/newroot
mount -t proc proc $r/proc \
    && mount -t sysfs sys $r/sys \
    && mount -t cgroup2 cgroup2 $r/sys/fs/cgroup \
    && mount -t devtmpfs dev $r/dev \
    && mkdir -p $r/dev/pts $r/dev/shm \
    && mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $r/dev/pts \
    && mount -t tmpfs -o mode=1777 shm $r/dev/shm \
    && mount -t tmpfs -o mode=755 run $r/run \
    && mount -t tmpfs -o mode=1777 tmp $r/tmp \
    || fail "mounting fresh proc, sys, dev, run, tmp"

# The host has no modules for this kernel: show the cached tree where
# modprobe looks, and let the kernel's module requests (`ip link add ...
# type wireguard`) run the host's modprobe inside the new root.
mkdir -p $r/lib/modules/$KVER && mount --bind "$r$MODULES_DIR" $r/lib/modules/$KVER \
    || fail "binding the modules of $KVER"
echo /bin/modprobe-newroot >/proc/sys/kernel/modprobe

hostname meshbox-vm
ip link set lo up || fail "bringing up lo"
cp /ctl/run.sh $r/run/meshbox-vm-command.sh || fail "reading the command"
stty -F /dev/ttyS1 raw -echo || fail "setting up ttyS1"

# The command is PID 1 of its own PID namespace: whatever it leaves running
# is killed when it ends, so nothing keeps ttyS1 open.
unshare --pid --fork --mount-proc=$r/proc \
    env -i /bin/chroot $r /bin/sh /run/meshbox-vm-command.sh \
    </dev/null >/dev/ttyS1 2>&1
echo $? >/ctl/rc
poweroff -f
