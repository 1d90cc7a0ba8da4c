#!/usr/bin/env bash
# netns_lab.sh: a NAT hole-punching lab for wgpunch, built from network namespaces.
# Run `netns_lab.sh --help` for the tour. Needs root; touches nothing outside its own
# namespaces, its state directory and the processes it starts.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SELF")")
STATE_ROOT=${LAB_STATE_ROOT:-/run/wgpunch-lab}
PYTHON=${PYTHON:-python3}
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1

# --- the lab's fixed plan ----------------------------------------------------------------
# Documentation and private ranges, alive only inside the lab's namespaces.
WG_PORT=51820
RDV_PORT=49918
INET_SRV=198.51.100.1 SRV_ADDR=198.51.100.2     # internet <-> public server
INET_A=203.0.113.1    PUB_A=203.0.113.2          # internet <-> NAT A (public side)
INET_B=192.0.2.1      PUB_B=192.0.2.2            # internet <-> NAT B (public side)
LAN_A_GW=192.168.1.1  ALICE_LAN=192.168.1.2      # NAT A LAN <-> Alice
LAN_B_GW=192.168.2.1  BOB_LAN=192.168.2.2        # NAT B LAN <-> Bob
BOB_SAME_LAN=192.168.1.3                          # Bob's address on NAT A's LAN (lan modes)
ALICE_TUN=10.99.0.1   BOB_TUN=10.99.0.2          # inside the WireGuard tunnel
# IPv6 (with --ipv6 or a fw6 router): one /64 per link from 2001:db8::/32, no NAT66. The
# inet router routes each LAN's /64 to its router's WAN address (a delegated prefix).
INET_SRV6=2001:db8:5::1    SRV_ADDR6=2001:db8:5::2     # internet <-> public server
INET_A6=2001:db8:f0a::1    PUB_A6=2001:db8:f0a::2      # internet <-> router A (WAN)
INET_B6=2001:db8:f0b::1    PUB_B6=2001:db8:f0b::2      # internet <-> router B (WAN)
LAN_A_GW6=2001:db8:a::1    ALICE_ADDR6=2001:db8:a::2   # LAN A (2001:db8:a::/64)
LAN_B_GW6=2001:db8:b::1    BOB_ADDR6=2001:db8:b::2     # LAN B (2001:db8:b::/64)
LAN_A_NET6=2001:db8:a::/64 LAN_B_NET6=2001:db8:b::/64
HOSTS="inet server nat-a nat-b alice bob"   # (+ cgn-a / cgn-b for a double NAT; no nat-b on one LAN)
NAT_MODES="cone fullcone symmetric fw6 udpblock double lan lan-nohairpin"
SAME_LAN_MODES="lan lan-nohairpin"                # both hosts behind nat-a (one LAN)
CGN_A_GW=100.64.1.1   CGN_A_LAN=100.64.1.2      # double NAT A: carrier NAT <-> home router WAN
CGN_B_GW=100.64.2.1   CGN_B_LAN=100.64.2.2      # double NAT B (RFC 6598 shared address space)
REBIND_BASE=40000                                 # `rebind` moves a host to BASE+n
RDV_NAME=rendezvous.lab                           # the server's name in alice's and bob's /etc/hosts

usage() {
  cat <<EOF
netns_lab.sh: see wgpunch punch through real NATs, on one machine, as root.

The lab is six network namespaces joined by veth pairs (none touches the root namespace):

    alice 192.168.1.2 -- [nat-a 192.168.1.1 | $PUB_A] --+
                                                             +-- inet -- server $SRV_ADDR
    bob   192.168.2.2 -- [nat-b 192.168.2.1 | $PUB_B] ----+

With a same-LAN mode (lan, lan-nohairpin) both hosts sit on one LAN (a bridge on nat-a)
behind one NAT, and there is no nat-b:

    alice 192.168.1.2 --+
                        +-- [nat-a 192.168.1.1 | $PUB_A] -- inet -- server $SRV_ADDR
    bob   $BOB_SAME_LAN --+

With IPv6 (--ipv6, or a fw6 router) every link also gets a /64 of the documentation
range 2001:db8::/32, routed (no NAT66; the inet router routes each LAN's /64 to it):

    alice $ALICE_ADDR6 -- [nat-a $LAN_A_GW6 | $PUB_A6] --+
                                                                     +-- inet -- server $SRV_ADDR6
    bob   $BOB_ADDR6 -- [nat-b $LAN_B_GW6 | $PUB_B6] --+

Alice and Bob each have wg0 (listen port $WG_PORT, tunnel addresses $ALICE_TUN and $BOB_TUN)
with the other as peer (allowed-ips, no endpoint). The server runs wg-rendezvous on
UDP $RDV_PORT; wg-punch on each side finds the other's public address:port there.

Usage: netns_lab.sh COMMAND [ARGS]

  demo [--nat-a MODE] [--nat-b MODE] [--ipv6] [--v2] [--stagger S] [--install]
       [--server-arg ARG]... [--punch-arg ARG]...
        Build a lab, start wg-rendezvous on the server and wg-punch on Alice and Bob,
        ping through the tunnel both ways, print the time from the second client's (Bob's)
        start to the first handshake and where it went, and tear everything down. Both
        clients start at once, or with --stagger S, Bob S seconds after Alice's first
        request is on the wire (Alice is already waiting, as in real life). Start here.
        --server-arg / --punch-arg append one argument (repeatable) to wg-rendezvous /
        both wg-punch runs, e.g. --server-arg --relay-port --server-arg 49920.
  check [--install]
        Say which tools are missing and the Debian packages that provide them;
        with --install, scripts/install-deps.sh --lab installs them (apt-get, pip).
  up [--nat-a MODE] [--nat-b MODE] [--ipv6] [--v2]
        Build a lab and leave it running (WireGuard configured, no client started).
  down  Remove the lab: its processes (by PID), namespaces and state. Idempotent.
  server [WG-RENDEZVOUS ARGS...]
        Run wg-rendezvous on the server host in the foreground, set up for this lab
        (its addresses; with --v2 its key and --require-auth); ARGS are appended.
  punch alice|bob [WG-PUNCH ARGS...]
        Run wg-punch on that host in the foreground: the server address that host
        reaches (IPv6 behind fw6), wg0, with --v2 the server's public key; ARGS appended.
  exec HOST CMD...
        Run CMD on HOST ($HOSTS). On alice and bob it also
        sees that host's private /run/wireguard. Replaces itself with CMD.
  status
        wg show on alice and bob, the routers' UDP conntrack entries, drop rules and
        (with IPv6) how many unsolicited inbound IPv6 packets their firewalls dropped.
  info  The lab's addresses, keys and settings as KEY=VALUE lines (with IPv6 also
        SRV_ADDR6, ALICE_ADDR6, BOB_ADDR6, PUB_A6, PUB_B6; with --v2 SERVER_PUBKEY).
  rebind a|b
        (same-LAN labs: a only, which moves Alice's mapping on the one router)
        Make the NAT map its host's WireGuard port to a new public port (${REBIND_BASE}+n)
        and forget the old mapping (conntrack entries flushed), like a NAT reboot.
        IPv4 only: there is nothing to rebind behind a fw6 router.
  drop a|b request|reply N
        Drop the next N rendezvous requests (leaving the LAN for UDP port $RDV_PORT) or
        replies (arriving from UDP port $RDV_PORT) that cross that router (N per address
        family when the lab has IPv6). Same-LAN labs: a only (both hosts' packets).

NAT modes (nftables on each router; the default is cone):
  cone       masquerade. Keeps the source port and hence the same public port for
             every destination; inbound packets pass only as replies to the exact
             address:port the host sent to (port-restricted cone).
  fullcone   cone mapping, and any outside host may send to a mapped public port: the
             router learns "public port -> host:port" from outgoing UDP and DNATs
             inbound UDP to that port back to the host (a dynamic nftables map).
  symmetric  masquerade fully-random: a new random public port for each destination.
             Hole punching through it needs port prediction; wg-punch should say so.
  fw6        an IPv6-only access network (like many mobile networks): no IPv4 beyond
             the LAN (the host has no IPv4 default route), and IPv6 through the
             router's stateful firewall. Turns --ipv6 on for the whole lab.
  udpblock   cone, behind a firewall that lets UDP out only to the rendezvous server's
             address (any port: rendezvous, NAT probes, relay) and drops all other UDP
             leaving the LAN (counted, comment "udp blocked"), as restrictive corporate
             or guest networks do: no direct path to any peer, only the relay. IPv4
             (with --ipv6 its IPv6 firewall is the usual one).
  double     NAT behind NAT: the home router (cone) has a shared address ($CGN_A_LAN /
             $CGN_B_LAN, RFC 6598) on its WAN, behind a carrier NAT (host cgn-a / cgn-b,
             also cone) that holds the public address. Both keep the port when they
             can, so it maps like one cone NAT. IPv4 only.
  lan        Alice and Bob on one LAN behind one router (nat-a; give it to --nat-a, or
             to both): a cone NAT with endpoint-independent mapping (RFC 4787 REQ-1: a
             LAN host:port keeps one public port for every destination, also when the
             two hosts' WireGuard ports collide: Bob's then gets another public port),
             and hairpinning (REQ-9): UDP from the LAN to $PUB_A and a mapped public
             port is sent to the LAN host holding that mapping, its source rewritten to
             the sender's public mapping, so the peer sees and answers the public
             endpoints (counted, comment "hairpin"). IPv4 only.
  lan-nohairpin
             the same router without hairpinning, like many cheap routers: LAN packets
             to its own public address are dropped (counted, comment "no hairpin"), so
             the peers' public endpoints do not work from inside; only the relay does.
Every router drops unsolicited packets addressed to itself, as home routers do.

IPv6 (--ipv6, or any fw6 router): every router is also an IPv6 stateful firewall, the
IPv6 analogue of a filtering NAT and what home routers do: no NAT66 (the host's own
address is its public one), outbound allowed, inbound only as part of a flow the host
started (conntrack established/related), unsolicited inbound dropped and counted. So
two hosts behind such firewalls still have to punch: both must send at once. --ipv6
with cone/fullcone/symmetric gives dual-stack hosts: IPv4 through that NAT, IPv6 through
the firewall.

Protocol v2 (--v2): up makes the server's key pair in the lab's state dir
(wg-rendezvous genkey/pubkey; $STATE_ROOT/PREFIX/server.key and .pub), and the server
runs with --key FILE --require-auth (classic requests are not answered); wg-punch gets
--server-key. Without --v2 both run the classic protocol.

Environment:
  LAB_PREFIX    namespace/state prefix (default: a fresh wgpl-XXXXXX kept in
                $STATE_ROOT/default for later commands)
  LAB_WG        auto (default: kernel WireGuard when 'ip link add type wireguard' works,
                else wireguard-go), kernel, or userspace
  LAB_TIMEOUT   demo: seconds to wait for the tunnel (default 20)
  LAB_SYM_PORTS   up: a symmetric NAT maps UDP into this port block only (LO-HI, e.g.
                40000-40255), like a port-block-allocating CGNAT (RFC 7422): what the
                spray needs to reach it (without it: any port 1024-65535)
  LAB_PROBE_PORT  the server also answers NAT probes on this port (wg-rendezvous
                --probe-port), and with --v2 wg-punch gets --probe-port: each side
                measures its NAT and the server forwards the verdicts (wg-punch netcheck)
  PYTHON        interpreter for wg-rendezvous and wg-punch (default python3); both run
                from this checkout ($REPO) via PYTHONPATH, without installing
  LAB_STATE_ROOT  where lab state lives (default /run/wgpunch-lab)

Timing many runs: scripts/lab_bench.py -n 10 (a table of time-to-tunnel per NAT pair;
--v2 for v2, --compare for classic and v2 side by side in one run, --stagger S as above).

Examples:
  sudo scripts/netns_lab.sh demo
  sudo scripts/netns_lab.sh demo --nat-a symmetric        # watch it fail, and say why
  sudo scripts/netns_lab.sh demo --v2                     # authenticated, coordinated punch
  sudo scripts/netns_lab.sh demo --v2 --nat-a fw6 --nat-b fw6   # v2 over IPv6 firewalls
  sudo scripts/netns_lab.sh demo --v2 --nat-a lan               # one LAN, through the hairpin
  sudo scripts/netns_lab.sh demo --v2 --nat-a lan-nohairpin --punch-arg --relay-after --punch-arg 3
  sudo scripts/netns_lab.sh up --nat-a fullcone
  sudo scripts/netns_lab.sh exec alice wg show
  sudo scripts/netns_lab.sh down
EOF
}

die() { echo "netns_lab: $*" >&2; exit 1; }
say() { echo "netns_lab: $*" >&2; }

# --- naming and state ----------------------------------------------------------------------
valid_prefix() { [[ $1 =~ ^[a-z0-9][a-z0-9-]{0,23}$ ]]; }

# Resolve the lab prefix P and its state dir S. $1=new: make a fresh default if needed.
resolve_prefix() {
  local want=${1:-}
  if [ -n "${LAB_PREFIX:-}" ]; then
    P=$LAB_PREFIX
  elif [ -f "$STATE_ROOT/default" ]; then
    P=$(cat "$STATE_ROOT/default")
  elif [ "$want" = new ]; then
    P=wgpl-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
    mkdir -p "$STATE_ROOT"
    echo "$P" >"$STATE_ROOT/default"
  else
    die "no lab found (LAB_PREFIX unset and no $STATE_ROOT/default); run 'up' first"
  fi
  valid_prefix "$P" || die "bad LAB_PREFIX '$P' (lowercase letters, digits, '-', max 24)"
  S=$STATE_ROOT/$P
}

ns_of() {
  case $1 in
    inet) echo "$P-inet" ;; server) echo "$P-srv" ;; nat-a) echo "$P-nat-a" ;;
    nat-b) echo "$P-nat-b" ;; alice) echo "$P-alice" ;; bob) echo "$P-bob" ;;
    cgn-a) echo "$P-cgn-a" ;; cgn-b) echo "$P-cgn-b" ;;
    *) die "unknown host '$1' (one of: $HOSTS)" ;;
  esac
}
all_ns() { local h; for h in $HOSTS cgn-a cgn-b; do ns_of "$h"; done; echo "$P-probe"; }
ns_exists() { [ -e "/run/netns/$1" ]; }

# "pid starttime" pidfiles: a recycled PID is never mistaken for ours.
starttime() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }
              set -- $s; echo "${20}"; }
running() {  # a zombie counts as gone: it holds nothing, and some inits reap slowly
  local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; s=${s##*) }; [ "${s%% *}" != Z ]; }
record_pid() { mkdir -p "$S/pids"; echo "$2 $(starttime "$2" || echo 0)" >"$S/pids/$1.pid"; }
live_pid() {  # live_pid NAME -> prints the PID if that process still runs
  local f=$S/pids/$1.pid pid st
  [ -f "$f" ] || return 1
  read -r pid st <"$f"
  [ "$(starttime "$pid" 2>/dev/null)" = "$st" ] && echo "$pid"
}

# --- running things on a host ----------------------------------------------------------------
# alice and bob have a holder process: a mount namespace with a private /run/wireguard
# (wireguard-go's UAPI socket path is global), inside the host's network namespace.
host_argv() {
  local h=$1 holder
  HOST_ARGV=()
  if [ "$h" = alice ] || [ "$h" = bob ]; then
    holder=$(live_pid "holder-$h") || die "$h's mount-namespace holder is gone (lab broken? try down/up)"
    HOST_ARGV=(nsenter -t "$holder" -m -n --)
  else
    HOST_ARGV=(ip netns exec "$(ns_of "$h")")
  fi
}
on() { local h=$1; shift; host_argv "$h"; "${HOST_ARGV[@]}" "$@"; }
# spawn NAME HOST CMD...: start a long-lived process on HOST, log to $S/logs/NAME.log.
spawn() {
  local name=$1 h=$2; shift 2
  mkdir -p "$S/logs"
  host_argv "$h"
  setsid "${HOST_ARGV[@]}" "$@" </dev/null >>"$S/logs/$name.log" 2>&1 &
  record_pid "$name" $!
  SPAWNED=$!
}

# --- dependencies ------------------------------------------------------------------------------
kernel_wg_works() {  # probe in a scratch namespace of ours
  local ns="$P-probe" ok=1
  ip netns add "$ns" 2>/dev/null || return 1
  ip -n "$ns" link add wgprobe type wireguard 2>/dev/null && ok=0
  ip netns del "$ns" 2>/dev/null || true
  return $ok
}

cmd_check() {
  local install=0 a
  for a in "$@"; do case $a in --install) install=1 ;; *) die "check: unknown option $a" ;; esac; done
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, nftables, WireGuard)"
  local pkgs=() pips=() t
  declare -A pkg_of=([ip]=iproute2 [ss]=iproute2 [nft]=nftables [wg]=wireguard-tools
    [ping]=iputils-ping [sysctl]=procps [unshare]=util-linux [nsenter]=util-linux
    [setsid]=util-linux [od]=coreutils)
  for t in ip ss nft wg ping sysctl unshare nsenter setsid od; do
    command -v "$t" >/dev/null || pkgs+=("${pkg_of[$t]}")
  done
  local wgmode=${LAB_WG:-auto}
  if [ "$wgmode" != kernel ] && ! command -v wireguard-go >/dev/null; then
    if [ "$wgmode" = userspace ] || ! { command -v ip >/dev/null && resolve_prefix_probe && kernel_wg_works; }; then
      pkgs+=(wireguard-go)
    fi
  fi
  local py_system=0
  [ "$(command -v "$PYTHON" 2>/dev/null)" = /usr/bin/python3 ] && py_system=1
  if ! command -v "$PYTHON" >/dev/null; then
    pkgs+=(python3 python3-pyroute2 python3-cffi python3-cryptography)
  elif ! "$PYTHON" -c "import pyroute2, cffi, cryptography" 2>/dev/null; then   # one start when all is well
    for t in pyroute2 cffi cryptography; do
      if ! "$PYTHON" -c "import $t" 2>/dev/null; then
        if [ $py_system = 1 ]; then pkgs+=("python3-$t"); else pips+=("$t"); fi
      fi
    done
  fi
  if [ ${#pkgs[@]} -eq 0 ] && [ ${#pips[@]} -eq 0 ]; then return 0; fi
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u | sed '/^$/d')
  if [ $install = 0 ]; then
    say "missing tools. Install them with:"
    [ ${#pkgs[@]} -eq 0 ] || echo "    apt-get install -y ${pkgs[*]}" >&2
    [ ${#pips[@]} -eq 0 ] || echo "    $PYTHON -m pip install ${pips[*]}" >&2
    say "or all at once: $REPO/scripts/install-deps.sh --lab   (or rerun with --install)"
    return 1
  fi
  # One installer knows the project's packages (also used by CI and the README).
  say "installing: ${pkgs[*]} ${pips[*]}"
  PYTHON=$PYTHON bash "$REPO/scripts/install-deps.sh" --lab
  cmd_check   # and prove it
}
resolve_prefix_probe() { P=${P:-wgpl-check$$}; }

# --- building the lab --------------------------------------------------------------------------
new_ns() {  # IPv6 off, or (IPV6=1) on with static addresses only: no RA, SLAAC or DAD
  ip netns add "$1"
  if [ "$IPV6" = 1 ]; then
    local c
    for c in all default; do
      ip netns exec "$1" sysctl -qw "net.ipv6.conf.$c.disable_ipv6=0" "net.ipv6.conf.$c.accept_ra=0" \
        "net.ipv6.conf.$c.autoconf=0" "net.ipv6.conf.$c.accept_dad=0"
    done
  else
    ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  fi
  ip -n "$1" link set lo up
}
addr6() { ip -n "$1" -6 addr add "$3/64" dev "$2" nodad; }  # addr6 NS IF ADDR
# link NS_A IF_A ADDR_A NS_B IF_B ADDR_B: a veth pair made directly inside the two namespaces.
link() {
  ip -n "$1" link add "$2" type veth peer name "$5" netns "$4"
  ip -n "$1" addr add "$3" dev "$2"; ip -n "$1" link set "$2" up
  ip -n "$4" addr add "$6" dev "$5"; ip -n "$4" link set "$5" up
}

# carrier CGN_NS HOME_NS GW ADDR: the carrier NAT of a double NAT (a cone router), its
# LAN link to the home router's WAN, and the home router's default route through it.
carrier() {
  new_ns "$1"
  ip netns exec "$1" sysctl -qw net.ipv4.ip_forward=1
  link "$1" lan "$3/24" "$2" wan "$4/24"
  ip -n "$2" route add default via "$3"
  nat_ruleset cone | ip netns exec "$1" nft -f -
}

# nat_ruleset MODE LAN_HOST: the router's nftables table (one table, flushed on reload).
nat_ruleset() {
  local mode=$1 masq='oifname "wan" masquerade'
  if same_lan_mode "$mode"; then lan_ruleset "$mode"; return; fi
  [ "$mode" = symmetric ] && masq='oifname "wan" masquerade fully-random'
  # LAB_SYM_PORTS=LO-HI: the symmetric NAT allocates UDP ports from that block only, as
  # port-block-allocating CGNATs do (RFC 7422); still a random port per destination
  [ "$mode" = symmetric ] && [ -n "${LAB_SYM_PORTS:-}" ] &&
    masq="oifname \"wan\" meta l4proto udp masquerade to :$LAB_SYM_PORTS fully-random; $masq"
  [ "$mode" = fw6 ] && masq='# fw6: nothing to masquerade (no IPv4 leaves the LAN)'
  cat <<EOF
table ip wgpunch_lab {
EOF
  if [ "$mode" = fullcone ]; then cat <<EOF
	# fullcone: public UDP port -> the LAN address:port that was mapped to it, learnt
	# after source NAT so it follows whatever port masquerade (or rebind) chose.
	map fullcone { type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout 10m; }
	chain fullcone_learn {
		type filter hook postrouting priority srcnat + 10;
		oifname "wan" meta l4proto udp update @fullcone { udp sport : ct original ip saddr . ct original proto-src }
	}
EOF
  fi
  cat <<EOF
	# test drops (\`drop\` adds counted rules here); before the forward filter
	chain drops { type filter hook forward priority filter - 10; }
	chain nat_pre {
		type nat hook prerouting priority dstnat;
EOF
  [ "$mode" = fullcone ] && echo '		iifname "wan" meta l4proto udp dnat ip to udp dport map @fullcone'
  cat <<EOF
	}
	chain nat_post {
		type nat hook postrouting priority srcnat;
		# \`rebind\` inserts host-specific snat rules above this line
		$masq
	}
	chain router_in {
		type filter hook input priority filter; policy accept;
		# unsolicited packets to the router itself die here, before conntrack confirms
		# them: no stale unreplied entry can push the host's next flow to another port
		iifname "wan" ct state established,related accept
		iifname "wan" drop
	}
	chain router_fwd {
		type filter hook forward priority filter; policy drop;
EOF
  if [ "$mode" = fw6 ]; then
    echo '		# fw6: an IPv6-only access network; no IPv4 leaves or enters the LAN'
  else
    [ "$mode" != udpblock ] || echo "		iifname \"lan\" oifname \"wan\" meta l4proto udp ip daddr != $SRV_ADDR counter drop comment \"udp blocked\""
    echo '		iifname "lan" oifname "wan" accept'
    echo '		iifname "wan" oifname "lan" ct state established,related accept'
  fi
  [ "$mode" = fullcone ] && echo '		iifname "wan" oifname "lan" ct status dnat accept'
  cat <<EOF
	}
}
EOF
}

same_lan_mode() { [[ " $SAME_LAN_MODES " == *" $1 "* ]]; }

# lan_ruleset MODE: nat-a's table when Alice and Bob share its LAN (lan, lan-nohairpin).
# A cone NAT whose mapping is endpoint-independent by construction (RFC 4787 REQ-1), not
# just by masquerade keeping the port: both hosts' WireGuard listens on $WG_PORT, so the
# second one to go out gets another public port from masquerade, and would get yet another
# for each new destination (nf_nat picks a random free port on a clash). Two maps, learnt
# from UDP flows through the WAN once conntrack has confirmed them (their replies, and
# their packets out after the first): a flow's first packet can still lose a race for its
# port (both hosts start at once, both get $WG_PORT, one is dropped at confirmation), and
# a mapping learnt from it would pin that host to a port it does not hold.
#   mapped:  LAN address . port -> public address . port  (new flows reuse the mapping)
#   hairpin: public port -> LAN address . port            (lan: where a hairpin goes)
# Hairpinning (lan, RFC 4787 REQ-9): UDP from the LAN to the router's public address and
# a mapped port is DNATed to the LAN host holding the mapping and SNATed to the sender's
# own public mapping, so the receiver sees (and answers) the sender's public endpoint and
# the reply comes back through the router. A map entry lives 10 minutes after its last
# packet.
lan_ruleset() {
  local mode=$1
  cat <<EOF
table ip wgpunch_lab {
	map mapped { type ipv4_addr . inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout 10m; }
	map hairpin { type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout 10m; }
	chain map_learn_in {
		type filter hook prerouting priority filter;
		iifname "wan" meta l4proto udp ct direction reply ct status snat update @mapped { ct original ip saddr . ct original proto-src : ct reply ip daddr . ct reply proto-dst }
		iifname "wan" meta l4proto udp ct direction reply ct status snat update @hairpin { ct reply proto-dst : ct original ip saddr . ct original proto-src }
	}
	chain map_learn {
		type filter hook postrouting priority srcnat + 10;
		oifname "wan" meta l4proto udp ct status confirmed update @mapped { ct original ip saddr . ct original proto-src : ip saddr . udp sport }
		oifname "wan" meta l4proto udp ct status confirmed update @hairpin { udp sport : ct original ip saddr . ct original proto-src }
	}
	# test drops (\`drop\` adds counted rules here); before the forward filter
	chain drops { type filter hook forward priority filter - 10; }
	chain nat_pre {
		type nat hook prerouting priority dstnat;
EOF
  [ "$mode" != lan ] ||
    echo "		iifname \"lan\" ip daddr $PUB_A meta l4proto udp dnat ip to udp dport map @hairpin"
  cat <<EOF
	}
	chain nat_post {
		type nat hook postrouting priority srcnat;
		# \`rebind\` inserts host-specific snat rules above this line
		oifname "wan" meta l4proto udp snat ip to ip saddr . udp sport map @mapped
EOF
  [ "$mode" != lan ] ||
    echo '		oifname "lan" ct status dnat meta l4proto udp snat ip to ip saddr . udp sport map @mapped'
  cat <<EOF
		oifname "wan" masquerade
	}
	chain router_in {
		type filter hook input priority filter; policy accept;
		iifname "wan" ct state established,related accept
		iifname "wan" drop
EOF
  if [ "$mode" = lan ]; then   # a hairpin to a port nobody holds ends here, no conntrack trace
    echo "		iifname \"lan\" ip daddr $PUB_A meta l4proto udp counter drop comment \"hairpin: no mapping\""
  else
    echo "		iifname \"lan\" ip daddr $PUB_A counter drop comment \"no hairpin\""
  fi
  cat <<EOF
	}
	chain router_fwd {
		type filter hook forward priority filter; policy drop;
		iifname "lan" oifname "wan" accept
		iifname "wan" oifname "lan" ct state established,related accept
EOF
  [ "$mode" != lan ] ||
    echo '		iifname "lan" oifname "lan" ct status dnat counter accept comment "hairpin"'
  cat <<EOF
	}
}
EOF
}

# lan_bridge ROUTER_NS: the one LAN of a same-LAN lab, a bridge "lan" on the router with
# Alice's and Bob's veths as ports. Hosts on it talk to each other at layer 2 (the
# router's IPv4 rules see only what it routes: bridged frames skip them); the router
# sends no ICMP redirects for what it hairpins back onto the LAN.
lan_bridge() {
  local r=$1 c h ns addr
  for c in all default; do ip netns exec "$r" sysctl -qw "net.ipv4.conf.$c.send_redirects=0"; done
  for c in iptables ip6tables arptables; do
    ip netns exec "$r" sysctl -qw "net.bridge.bridge-nf-call-$c=0" 2>/dev/null || true
  done
  ip -n "$r" link add lan type bridge
  ip -n "$r" addr add "$LAN_A_GW/24" dev lan
  ip -n "$r" link set lan up
  for h in alice bob; do
    ns=$(ns_of "$h") addr=$ALICE_LAN
    [ "$h" = alice ] || addr=$BOB_LAN
    ip -n "$r" link add "lan-$h" type veth peer name eth0 netns "$ns"
    ip -n "$r" link set "lan-$h" master lan up
    ip -n "$ns" addr add "$addr/24" dev eth0; ip -n "$ns" link set eth0 up
  done
}

# fw6_ruleset: every router's IPv6 table when the lab has IPv6 (whatever its IPv4 mode).
# No NAT66: the LAN's /64 is routed. A stateful firewall, as home routers do for IPv6:
# outbound allowed, inbound only as part of a flow the LAN host started (conntrack
# established/related, which also admits ICMPv6 errors), unsolicited inbound dropped and
# counted. Neighbour discovery on the WAN link is the one thing let in to the router.
fw6_ruleset() {
  cat <<EOF
table ip6 wgpunch_lab6 {
	chain drops { type filter hook forward priority filter - 10; }
	chain router_in {
		type filter hook input priority filter; policy accept;
		iifname "wan" ct state established,related accept
		iifname "wan" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
		iifname "wan" drop
	}
	chain router_fwd {
		type filter hook forward priority filter; policy drop;
		iifname "lan" oifname "wan" accept
		iifname "wan" oifname "lan" ct state established,related accept
		iifname "wan" oifname "lan" counter drop comment "unsolicited"
	}
}
EOF
}

# A long-lived process owning HOST's private /run/wireguard, and its /etc/hosts (the
# lab's $S/hosts: the server's name $RDV_NAME, with both addresses when the lab has IPv6).
make_holder() {
  local h=$1
  mkdir -p /run/wireguard   # the mount point (wireguard-tools makes it anyway)
  setsid ip netns exec "$(ns_of "$h")" unshare -m --propagation private \
    sh -c 'mount --bind "$1" /etc/hosts &&
           mount -t tmpfs -o mode=0700,size=1m wgpunch-lab /run/wireguard && exec sleep infinity' \
    holder "$S/hosts" \
    </dev/null >/dev/null 2>&1 &
  record_pid "holder-$h" $!
  local i
  for i in $(seq 100); do   # ready once its mount table shows our tmpfs
    awk '$5 == "/run/wireguard" && / - tmpfs wgpunch-lab / { f = 1 } END { exit !f }' \
      "/proc/$!/mountinfo" 2>/dev/null && return 0
    running $! || break
    sleep 0.02
  done
  die "could not start the mount-namespace holder for $h"
}

make_wg() {  # make_wg HOST ADDR PEER_HOST PEER_ADDR
  local h=$1 addr=$2 peer=$3 peer_addr=$4 holder i
  if [ "$WG_IMPL" = kernel ]; then
    ip -n "$(ns_of "$h")" link add wg0 type wireguard
  else
    spawn "wireguard-go-$h" "$h" wireguard-go -f wg0
    holder=$(live_pid "holder-$h")
    for i in $(seq 250); do
      [ -S "/proc/$holder/root/run/wireguard/wg0.sock" ] && break
      running "$SPAWNED" || die "wireguard-go on $h exited: $(tail -n5 "$S/logs/wireguard-go-$h.log")"
      sleep 0.02
    done
    [ -S "/proc/$holder/root/run/wireguard/wg0.sock" ] || die "wireguard-go on $h: no UAPI socket"
  fi
  # The peer gets allowed-ips but NO endpoint: finding it is wg-punch's job. Nothing is
  # routed into wg0 here (wireguard-go would start a handshake it cannot send and then
  # hold off new ones for 5 s).
  on "$h" wg set wg0 private-key "$S/$h.key" listen-port "$WG_PORT" \
    peer "$(cat "$S/$peer.pub")" allowed-ips "$peer_addr/32"
  on "$h" ip addr add "$addr/24" dev wg0
  on "$h" ip link set wg0 up
}

cmd_up() {
  local nat_a=cone nat_b=cone v2=0 given_a=0 given_b=0
  IPV6=0
  while [ $# -gt 0 ]; do
    case $1 in
      --nat-a) nat_a=${2:-}; given_a=1; shift 2 ;;
      --nat-b) nat_b=${2:-}; given_b=1; shift 2 ;;
      --ipv6) IPV6=1; shift ;;
      --v2) v2=1; shift ;;
      *) die "up: unknown argument '$1' (see --help)" ;;
    esac
  done
  local m
  for m in "$nat_a" "$nat_b"; do
    [[ " $NAT_MODES " == *" $m "* ]] || die "unknown NAT mode '$m' (one of: $NAT_MODES)"
    [ "$m" = fw6 ] && IPV6=1   # an IPv6-only LAN needs IPv6 on the whole lab
  done
  if [ "$IPV6" = 1 ] && { [ "$nat_a" = double ] || [ "$nat_b" = double ]; }; then
    die "the double NAT is IPv4 only (no --ipv6, no fw6 on the other side)"
  fi
  # One LAN, one router: a same-LAN mode is the lab's layout, so it names both sides.
  SAME_LAN=0
  if same_lan_mode "$nat_a" || same_lan_mode "$nat_b"; then
    if [ $given_b = 0 ]; then nat_b=$nat_a; elif [ $given_a = 0 ]; then nat_a=$nat_b; fi
    [ "$nat_a" = "$nat_b" ] || die "a same-LAN mode puts both hosts behind nat-a: NAT A and" \
      "NAT B must be the same ($nat_a, $nat_b)"
    [ "$IPV6" = 0 ] || die "the same-LAN modes ($SAME_LAN_MODES) are IPv4 only (no --ipv6)"
    SAME_LAN=1 BOB_LAN=$BOB_SAME_LAN
  fi
  [ "$(id -u)" = 0 ] || die "needs root"
  resolve_prefix new
  local n
  for n in $(all_ns); do ns_exists "$n" && die "lab $P already exists ($n); run down first"; done
  [ -e "$S" ] && die "lab $P already has state in $S; run down first"
  mkdir -p "$S"
  # Any failure from here on (error or die) removes the half-built lab.
  UP_DONE=0
  trap 'if [ "$UP_DONE" = 0 ]; then say "up failed; removing the half-built lab $P"; cmd_down >/dev/null 2>&1 || true; fi' EXIT

  case ${LAB_WG:-auto} in
    kernel) kernel_wg_works || die "LAB_WG=kernel but 'ip link add type wireguard' fails"; WG_IMPL=kernel ;;
    userspace) WG_IMPL=userspace ;;
    auto) if kernel_wg_works; then WG_IMPL=kernel; else WG_IMPL=userspace; fi ;;
    *) die "LAB_WG must be auto, kernel or userspace" ;;
  esac
  [ "$WG_IMPL" = kernel ] || command -v wireguard-go >/dev/null ||
    die "no kernel WireGuard and no wireguard-go (apt-get install wireguard-go)"

  local inet srv na nb al bo
  inet=$(ns_of inet) srv=$(ns_of server) na=$(ns_of nat-a) nb=$(ns_of nat-b)
  al=$(ns_of alice) bo=$(ns_of bob)
  local routers="$na $nb"
  [ "$SAME_LAN" = 0 ] || routers=$na   # one LAN: no nat-b
  for n in "$inet" "$srv" $routers "$al" "$bo"; do new_ns "$n"; done
  for n in "$inet" $routers; do
    ip netns exec "$n" sysctl -qw net.ipv4.ip_forward=1
    [ "$IPV6" = 0 ] || ip netns exec "$n" sysctl -qw net.ipv6.conf.all.forwarding=1
  done

  link "$inet" srv0 "$INET_SRV/24" "$srv" eth0 "$SRV_ADDR/24"
  # a double NAT's carrier router holds the public address; the home router behind it
  local wan_a=$na wan_b=$nb
  if [ "$nat_a" = double ]; then wan_a=$(ns_of cgn-a); carrier "$wan_a" "$na" "$CGN_A_GW" "$CGN_A_LAN"; fi
  if [ "$nat_b" = double ]; then wan_b=$(ns_of cgn-b); carrier "$wan_b" "$nb" "$CGN_B_GW" "$CGN_B_LAN"; fi
  link "$inet" nata0 "$INET_A/24" "$wan_a" wan "$PUB_A/24"
  ip -n "$srv" route add default via "$INET_SRV"
  ip -n "$wan_a" route add default via "$INET_A"
  local bob_gw=$LAN_B_GW
  if [ "$SAME_LAN" = 1 ]; then
    lan_bridge "$na"; bob_gw=$LAN_A_GW
  else
    link "$inet" natb0 "$INET_B/24" "$wan_b" wan "$PUB_B/24"
    link "$na" lan "$LAN_A_GW/24" "$al" eth0 "$ALICE_LAN/24"
    link "$nb" lan "$LAN_B_GW/24" "$bo" eth0 "$BOB_LAN/24"
    ip -n "$wan_b" route add default via "$INET_B"
  fi
  # an IPv6-only (fw6) LAN host has no IPv4 route beyond its LAN, like a real one
  [ "$nat_a" = fw6 ] || ip -n "$al" route add default via "$LAN_A_GW"
  [ "$nat_b" = fw6 ] || ip -n "$bo" route add default via "$bob_gw"
  if [ "$IPV6" = 1 ]; then
    addr6 "$inet" srv0 "$INET_SRV6"; addr6 "$srv" eth0 "$SRV_ADDR6"
    addr6 "$inet" nata0 "$INET_A6"; addr6 "$na" wan "$PUB_A6"
    addr6 "$inet" natb0 "$INET_B6"; addr6 "$nb" wan "$PUB_B6"
    addr6 "$na" lan "$LAN_A_GW6"; addr6 "$al" eth0 "$ALICE_ADDR6"
    addr6 "$nb" lan "$LAN_B_GW6"; addr6 "$bo" eth0 "$BOB_ADDR6"
    ip -n "$inet" -6 route add "$LAN_A_NET6" via "$PUB_A6"
    ip -n "$inet" -6 route add "$LAN_B_NET6" via "$PUB_B6"
    ip -n "$srv" -6 route add default via "$INET_SRV6"
    ip -n "$na" -6 route add default via "$INET_A6"
    ip -n "$nb" -6 route add default via "$INET_B6"
    ip -n "$al" -6 route add default via "$LAN_A_GW6"
    ip -n "$bo" -6 route add default via "$LAN_B_GW6"
  fi

  nat_ruleset "$nat_a" | ip netns exec "$na" nft -f -
  [ "$SAME_LAN" = 1 ] || nat_ruleset "$nat_b" | ip netns exec "$nb" nft -f -
  if [ "$IPV6" = 1 ]; then
    fw6_ruleset | ip netns exec "$na" nft -f -
    fw6_ruleset | ip netns exec "$nb" nft -f -
  fi

  (umask 077; for h in alice bob; do wg genkey >"$S/$h.key"; wg pubkey <"$S/$h.key" >"$S/$h.pub"; done)
  [ $v2 = 0 ] || make_server_key
  cat >"$S/config" <<EOF
NAT_A=$nat_a
NAT_B=$nat_b
WG_IMPL=$WG_IMPL
IPV6=$IPV6
V2=$v2
SAME_LAN=$SAME_LAN
EOF
  { echo "127.0.0.1 localhost"; echo "$SRV_ADDR $RDV_NAME"
    [ "$IPV6" = 0 ] || echo "$SRV_ADDR6 $RDV_NAME"; } >"$S/hosts"
  make_holder alice; make_holder bob
  make_wg alice "$ALICE_TUN" bob "$BOB_TUN"
  make_wg bob "$BOB_TUN" alice "$ALICE_TUN"
  UP_DONE=1; trap - EXIT
  say "lab $P is up (NAT A: $nat_a, NAT B: $nat_b, WireGuard: $WG_IMPL, IPv6: $(yesno "$IPV6"), protocol: $(proto_name "$v2"))"
}

yesno() { if [ "$1" = 1 ]; then echo yes; else echo no; fi; }
proto_name() { if [ "$1" = 1 ]; then echo v2; else echo classic; fi; }

# The rendezvous server's own X25519 key pair (v2), made by wg-rendezvous itself.
make_server_key() {
  (umask 077; rdv_tool genkey >"$S/server.key") ||
    die "wg-rendezvous genkey failed: this checkout's server has no v2 yet?"
  rdv_tool pubkey <"$S/server.key" >"$S/server.pub" || die "wg-rendezvous pubkey failed"
}
rdv_tool() { env "PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m rendezvous "$@"; }

load_config() {
  [ -f "$S/config" ] || die "lab $P is not up (no $S/config)"
  IPV6=0 V2=0 SAME_LAN=0   # labs made before these settings existed
  # shellcheck disable=SC1091
  . "$S/config"
  [ "$SAME_LAN" = 0 ] || BOB_LAN=$BOB_SAME_LAN PUB_B=$PUB_A   # Bob is behind nat-a too
}

# --- tearing down --------------------------------------------------------------------------------
cmd_down() {
  resolve_prefix_quiet || return 0
  local pids=() f pid st n i
  if [ -d "$S/pids" ]; then
    for f in "$S"/pids/*.pid; do
      [ -f "$f" ] || continue
      read -r pid st <"$f" || continue
      [ "$(starttime "$pid" 2>/dev/null)" = "$st" ] && pids+=("$pid")
    done
  fi
  for n in $(all_ns); do   # anything else still running inside the lab (e.g. from `exec`)
    ns_exists "$n" || continue
    for pid in $(ip netns pids "$n" 2>/dev/null); do pids+=("$pid"); done
  done
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for i in $(seq 60); do
      local alive=()
      for pid in "${pids[@]}"; do running "$pid" && alive+=("$pid"); done
      [ ${#alive[@]} -eq 0 ] && break
      [ "$i" = 60 ] && kill -KILL "${alive[@]}" 2>/dev/null || true
      sleep 0.05
    done
  fi
  for n in $(all_ns); do
    ns_exists "$n" && { ip netns del "$n" 2>/dev/null || say "could not delete namespace $n"; }
  done
  rm -rf "$S"
  if [ -f "$STATE_ROOT/default" ] && [ "$(cat "$STATE_ROOT/default")" = "$P" ]; then
    rm -f "$STATE_ROOT/default"
  fi
  rmdir "$STATE_ROOT" 2>/dev/null || true
  local left=()
  for n in $(all_ns); do ns_exists "$n" && left+=("$n"); done
  [ ${#left[@]} -eq 0 ] || die "left behind: ${left[*]}"
  say "lab $P is down"
}
resolve_prefix_quiet() {
  if [ -n "${LAB_PREFIX:-}" ]; then P=$LAB_PREFIX
  elif [ -f "$STATE_ROOT/default" ]; then P=$(cat "$STATE_ROOT/default")
  else say "no lab to remove"; return 1; fi
  valid_prefix "$P" || die "bad LAB_PREFIX '$P'"
  S=$STATE_ROOT/$P
}

# --- inspecting and poking a running lab ----------------------------------------------------------
cmd_exec() {
  [ $# -ge 2 ] || die "usage: exec HOST CMD..."
  resolve_prefix
  local h=$1; shift
  ns_of "$h" >/dev/null
  ns_exists "$(ns_of "$h")" || die "lab $P has no $h (is it up?)"
  host_argv "$h"
  exec "${HOST_ARGV[@]}" "$@"
}

cmd_info() {
  resolve_prefix; load_config
  cat <<EOF
PREFIX=$P
STATE=$S
WG_IMPL=$WG_IMPL
NAT_A=$NAT_A
NAT_B=$NAT_B
SERVER=$SRV_ADDR
RDV_PORT=$RDV_PORT
WG_PORT=$WG_PORT
PUB_A=$PUB_A
PUB_B=$PUB_B
ALICE_LAN=$ALICE_LAN
BOB_LAN=$BOB_LAN
ALICE_TUN=$ALICE_TUN
BOB_TUN=$BOB_TUN
ALICE_PUBKEY=$(cat "$S/alice.pub")
BOB_PUBKEY=$(cat "$S/bob.pub")
IPV6=$IPV6
SAME_LAN=$SAME_LAN
PROTOCOL=$(proto_name "$V2")
ALICE_RDV=$(rdv_for alice)
BOB_RDV=$(rdv_for bob)
EOF
  [ "$IPV6" = 0 ] || cat <<EOF
SRV_ADDR6=$SRV_ADDR6
PUB_A6=$PUB_A6
PUB_B6=$PUB_B6
ALICE_ADDR6=$ALICE_ADDR6
BOB_ADDR6=$BOB_ADDR6
EOF
  [ "$V2" = 0 ] || cat <<EOF
SERVER_KEY_FILE=$S/server.key
SERVER_PUBKEY=$(cat "$S/server.pub")
EOF
}

# rdv_for HOST: the server as HOST's wg-punch is given it: its IPv6 address behind fw6;
# in a v2 lab with IPv6, its name (both addresses: wg-punch asks over both families);
# else its IPv4 address.
rdv_for() {
  local mode=$NAT_A
  [ "$1" = bob ] && mode=$NAT_B
  if [ "$mode" = fw6 ]; then echo "[$SRV_ADDR6]:$RDV_PORT"
  elif [ "$V2" = 1 ] && [ "$IPV6" = 1 ]; then echo "$RDV_NAME:$RDV_PORT"
  else echo "$SRV_ADDR:$RDV_PORT"; fi
}

cmd_status() {
  resolve_prefix; load_config
  echo "lab $P (NAT A: $NAT_A, NAT B: $NAT_B, WireGuard: $WG_IMPL, IPv6: $(yesno "$IPV6"), protocol: $(proto_name "$V2"))"
  local h
  for h in alice bob; do echo "== $h: wg show"; on "$h" wg show wg0 || true; done
  local fams=ipv4 f
  [ "$IPV6" = 0 ] || fams="ipv4 ipv6"
  for h in nat-a nat-b; do
    ns_exists "$(ns_of "$h")" || continue   # no nat-b on one LAN
    for f in $fams; do
      echo "== $h: UDP conntrack ($f)"
      if command -v conntrack >/dev/null; then on "$h" conntrack -L -f "$f" -p udp 2>/dev/null || true
      else echo "(install conntrack to see them)"; fi
    done
    echo "== $h: drop rules"; on "$h" nft list chain ip wgpunch_lab drops | grep -w drop || true
    if [ "$SAME_LAN" = 1 ]; then
      echo "== $h: mappings and hairpin counters"
      on "$h" nft list map ip wgpunch_lab mapped | grep -w elements || true
      on "$h" nft list table ip wgpunch_lab | grep -E 'comment "(hairpin|no hairpin)' || true
    fi
    if [ "$IPV6" = 1 ]; then
      on "$h" nft list chain ip6 wgpunch_lab6 drops | grep -w drop || true
      echo "== $h: IPv6 firewall, unsolicited inbound dropped"
      on "$h" nft list chain ip6 wgpunch_lab6 router_fwd | grep -w unsolicited || true
    fi
  done
}

nat_host() {
  [ "$1" != b ] || [ "$SAME_LAN" = 0 ] ||
    die "a same-LAN lab has one router, nat-a (both hosts are behind it): use a, not b"
  case $1 in a) echo nat-a ;; b) echo nat-b ;; *) die "NAT must be a or b, not '$1'" ;; esac
}

cmd_rebind() {
  [ $# -eq 1 ] || die "usage: rebind a|b"
  resolve_prefix; load_config
  command -v conntrack >/dev/null || die "rebind needs conntrack (apt-get install conntrack)"
  local nat lan pub n port mode
  nat=$(nat_host "$1")
  if [ "$1" = a ]; then lan=$ALICE_LAN pub=$PUB_A mode=$NAT_A; else lan=$BOB_LAN pub=$PUB_B mode=$NAT_B; fi
  [ "$mode" != fw6 ] || die "rebind: router $1 is fw6, which maps nothing (no NAT66, no IPv4)"
  n=$(( $(cat "$S/rebind-$1" 2>/dev/null || echo 0) + 1 ))
  port=$((REBIND_BASE + n))
  # New rule first (newest on top), then forget the old mappings so the next packet
  # from the host gets the new one.
  on "$nat" nft insert rule ip wgpunch_lab nat_post oifname wan ip saddr "$lan" \
    udp sport "$WG_PORT" snat ip to "$pub:$port"
  on "$nat" conntrack -D -s "$lan" >/dev/null 2>&1 || true
  on "$nat" conntrack -D --reply-src "$lan" >/dev/null 2>&1 || true
  if [ "$SAME_LAN" = 1 ]; then   # forget the learnt mapping too (hairpins use the new one)
    on "$nat" nft delete element ip wgpunch_lab mapped "{ $lan . $WG_PORT }" 2>/dev/null || true
  fi
  echo "$n" >"$S/rebind-$1"
  say "NAT $1 now maps $lan:$WG_PORT to $pub:$port"
  echo "$pub:$port"
}

cmd_drop() {
  [ $# -eq 3 ] || die "usage: drop a|b request|reply N"
  resolve_prefix; load_config
  local nat match
  nat=$(nat_host "$1")
  [[ $3 =~ ^[0-9]+$ ]] && [ "$3" -gt 0 ] || die "N must be a positive integer"
  case $2 in
    request) match="iifname lan udp dport $RDV_PORT" ;;
    reply) match="iifname wan udp sport $RDV_PORT" ;;
    *) die "drop what? request or reply, not '$2'" ;;
  esac
  # numgen inc counts the packets this rule sees: the first N are dropped, later ones pass.
  # One rule per address family, each with its own count.
  on "$nat" nft add rule ip wgpunch_lab drops $match numgen inc mod 1000000000 '<' "$3" \
    counter drop comment "\"$2 x$3\""
  [ "$IPV6" = 0 ] || on "$nat" nft add rule ip6 wgpunch_lab6 drops $match \
    numgen inc mod 1000000000 '<' "$3" counter drop comment "\"$2 x$3\""
  say "NAT $1 drops the next $3 rendezvous $2(s)$( [ "$IPV6" = 0 ] || echo ' per address family')"
}

# --- the programs under test ------------------------------------------------------------------------
pyenv() { PYENV=(env "PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}"); }

# server_argv: wg-rendezvous as this lab runs it (in SERVER_ARGV).
server_argv() {
  pyenv
  SERVER_ARGV=("${PYENV[@]}" "$PYTHON" -m rendezvous --listen "$SRV_ADDR")
  # classic is IPv4 only; v2 also listens on the server's IPv6 address if the lab has one
  [ "$IPV6" = 0 ] || [ "$V2" = 0 ] || SERVER_ARGV+=(--listen "$SRV_ADDR6")
  SERVER_ARGV+=(--port "$RDV_PORT" -v)
  [ "$V2" = 0 ] || SERVER_ARGV+=(--key "$S/server.key" --require-auth)
  [ -z "${LAB_PROBE_PORT:-}" ] || SERVER_ARGV+=(--probe-port "$LAB_PROBE_PORT")
}
# punch_argv HOST: wg-punch as this lab runs it on HOST (in PUNCH_ARGV); options go first.
punch_argv() {
  pyenv
  PUNCH_ARGV=("${PYENV[@]}" "$PYTHON" -m punch)
  # Each host's state file (wg-punch status) lives in the lab's state dir: both hosts'
  # interfaces are called wg0, and the host's own /run/wg-punch is not the lab's.
  PUNCH_ARGV+=(--state-dir "$S/punch-state/$1")
  [ "$V2" = 0 ] || PUNCH_ARGV+=(--server-key "$(cat "$S/server.pub")")
  [ -z "${LAB_PROBE_PORT:-}" ] || [ "$V2" = 0 ] || PUNCH_ARGV+=(--probe-port "$LAB_PROBE_PORT")
  PUNCH_ARGV+=("$(rdv_for "$1")" wg0)
}

cmd_server() {
  resolve_prefix; load_config
  ns_exists "$(ns_of server)" || die "lab $P has no server (is it up?)"
  server_argv; host_argv server
  exec "${HOST_ARGV[@]}" "${SERVER_ARGV[@]}" "$@"
}

cmd_punch() {
  [ $# -ge 1 ] || die "usage: punch alice|bob [WG-PUNCH ARGS...]"
  case $1 in alice|bob) ;; *) die "punch runs on alice or bob, not '$1'" ;; esac
  resolve_prefix; load_config
  local h=$1; shift
  punch_argv "$h"; host_argv "$h"
  local last=$((${#PUNCH_ARGV[@]} - 2))   # the user's options go before SERVER and wg0
  exec "${HOST_ARGV[@]}" "${PUNCH_ARGV[@]:0:$last}" "$@" "${PUNCH_ARGV[@]:$last}"
}

# --- the demo ---------------------------------------------------------------------------------------
now_us() { echo "${EPOCHREALTIME/./}"; }

# log_ms LOG ERE: ms since t0 (microseconds, $3) of LOG's first line matching ERE; -1 if none.
# wg-punch -v lines start with "YYYY-MM-DD HH:MM:SS,mmm" (local time).
log_ms() {
  local line
  line=$(grep -m1 -E "$2" "$1" 2>/dev/null) || { echo -1; return; }
  local secs; secs=$(date -d "${line:0:19}" +%s 2>/dev/null) || { echo -1; return; }
  echo $(( secs * 1000 + 10#${line:20:3} - $3 / 1000 ))
}

# mapping_of LAN_ADDR: the public address:port nat-a maps LAN_ADDR:$WG_PORT to (its
# `mapped` map, same-LAN labs), or "none".
mapping_of() {
  local m
  m=$(on nat-a nft list map ip wgpunch_lab mapped 2>/dev/null | tr -d '\n' | tr ',{}' '\n\n\n' |
      awk -v k="$1" -v p="$WG_PORT" '$1 == k && $2 == "." && $3 == p { print $(NF-2) ":" $NF; exit }')
  echo "${m:-none}"
}

handshake_time() {  # prints the newest handshake time on HOST's wg0 (0 = none)
  on "$1" wg show wg0 latest-handshakes 2>/dev/null | awk '{ if ($2 > m) m = $2 } END { print m + 0 }'
}

cmd_demo() {
  local up_args=() install=0 stagger= server_extra=() punch_extra=()
  while [ $# -gt 0 ]; do
    case $1 in
      --nat-a|--nat-b) up_args+=("$1" "${2:-}"); shift 2 ;;
      --server-arg|--punch-arg) [ $# -ge 2 ] || die "demo: $1 wants an argument"
        if [ "$1" = --server-arg ]; then server_extra+=("$2"); else punch_extra+=("$2"); fi
        shift 2 ;;
      --ipv6|--v2) up_args+=("$1"); shift ;;
      --install) install=1; shift ;;
      --stagger) stagger=${2:-}; shift 2
        [[ $stagger =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "demo: --stagger wants seconds, not '$stagger'" ;;
      *) die "demo: unknown argument '$1' (see --help)" ;;
    esac
  done
  if [ $install = 1 ]; then cmd_check --install; else cmd_check || exit 1; fi
  for m in rendezvous punch; do
    [ -f "$REPO/$m/__main__.py" ] || die "$REPO/$m/__main__.py is missing: this checkout has no runnable $m yet"
  done
  [ -n "${LAB_PREFIX:-}" ] || LAB_PREFIX=wgpl-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
  export LAB_PREFIX
  trap 'cmd_down >/dev/null 2>&1 || true' EXIT
  trap 'exit 130' INT TERM HUP
  cmd_up "${up_args[@]}"
  trap 'cmd_down >/dev/null 2>&1 || true' EXIT
  resolve_prefix; load_config
  local limit=${LAB_TIMEOUT:-20}

  server_argv
  spawn server server "${SERVER_ARGV[@]}" ${server_extra[@]+"${server_extra[@]}"}
  local i
  for i in $(seq 250); do
    on server ss -Hlun "sport = :$RDV_PORT" | grep -q . && break
    running "$SPAWNED" || { cat "$S/logs/server.log" >&2; die "wg-rendezvous exited"; }
    sleep 0.02
  done
  say "wg-rendezvous listens on UDP $RDV_PORT ($(proto_name "$V2"))"

  punch_argv alice
  spawn punch-alice alice "${PUNCH_ARGV[@]}" --timeout "$limit" -v ${punch_extra[@]+"${punch_extra[@]}"}
  local pa=$SPAWNED
  if [ -n "$stagger" ]; then   # Alice first: Bob once her first request is out, + S seconds
    for i in $(seq 500); do
      grep -q ' DEBUG asking for ' "$S/logs/punch-alice.log" 2>/dev/null && break
      running "$pa" || break
      sleep 0.02
    done
    sleep "$stagger"
  fi
  punch_argv bob
  local t0; t0=$(now_us)
  spawn punch-bob bob "${PUNCH_ARGV[@]}" --timeout "$limit" -v ${punch_extra[@]+"${punch_extra[@]}"}
  local pb=$SPAWNED
  say "wg-punch started on alice and bob; waiting up to ${limit}s for a handshake"
  local t1=0 deadline=$(( t0 + limit * 1000000 ))
  while [ "$(now_us)" -lt $deadline ]; do   # no sleep: one round of checks takes ~20 ms
    if [ "$(handshake_time alice)" != 0 ] || [ "$(handshake_time bob)" != 0 ]; then t1=$(now_us); break; fi
  done
  local ra=0 rb=0
  wait $pa || ra=$?; wait $pb || rb=$?
  echo "wg-punch on alice exited $ra, on bob $rb"
  for h in alice bob; do echo "== $h"; on "$h" wg show wg0 | sed -n '/^peer/,$p'; done
  local ok=1 ttt=-1
  if [ "$t1" = 0 ]; then
    ok=0
    echo "no handshake within ${limit}s."
    [ "$NAT_A" != symmetric ] && [ "$NAT_B" != symmetric ] ||
      echo "(expected: a symmetric NAT gives a new public port per destination, so the" \
           "address the server saw is not the one the peer must use)"
    [ "$NAT_A" != lan-nohairpin ] ||
      echo "(expected without a relay: the router drops LAN packets to its own public" \
           "address, so neither peer's public endpoint works from the LAN; try --v2" \
           "--server-arg --relay-port --server-arg 49920 --punch-arg --relay-after --punch-arg 3)"
    for f in punch-alice punch-bob server; do echo "-- $f log (tail)"; tail -n 8 "$S/logs/$f.log"; done
  else
    ttt=$(( (t1 - t0) / 1000 ))
    if on alice ping -c 3 -i 0.2 -W 2 -q "$BOB_TUN" && on bob ping -c 3 -i 0.2 -W 2 -q "$ALICE_TUN"; then
      echo "ping through the tunnel works both ways"
    else
      ok=0; echo "handshake done but ping through the tunnel failed"
    fi
    printf 'time from the second client start to the first handshake: %d.%03d s\n' $((ttt / 1000)) $((ttt % 1000))
  fi
  # Where the time went, from the clients' logs (ms after Bob's client was started).
  local b_ask b_set a_set
  b_ask=$(log_ms "$S/logs/punch-bob.log" ' DEBUG asking for ' "$t0")
  b_set=$(log_ms "$S/logs/punch-bob.log" ' INFO peer .*: endpoint ' "$t0")
  a_set=$(log_ms "$S/logs/punch-alice.log" ' INFO peer .*: endpoint ' "$t0")
  echo "timeline (ms after Bob's wg-punch was started): first request $b_ask," \
       "Bob's endpoint set $b_set, Alice's endpoint set $a_set, first handshake seen $ttt"
  # Where each side's WireGuard sends to the other at the end, and the addresses that
  # mean "direct" (the peer's public ones) or "the server" (a relay), for callers that
  # classify runs (scripts/connectivity_grid.py).
  local a_ep b_ep pub_a=$PUB_A pub_b=$PUB_B srv=$SRV_ADDR
  a_ep=$(on alice wg show wg0 endpoints 2>/dev/null | awk 'NR==1 { print $2 }')
  b_ep=$(on bob wg show wg0 endpoints 2>/dev/null | awk 'NR==1 { print $2 }')
  [ "$NAT_A" != fw6 ] || pub_a=
  [ "$NAT_B" != fw6 ] || pub_b=
  if [ "$IPV6" = 1 ]; then
    pub_a=${pub_a:+$pub_a,}$ALICE_ADDR6 pub_b=${pub_b:+$pub_b,}$BOB_ADDR6 srv=$srv,$SRV_ADDR6
  fi
  # On one LAN both public addresses are the router's: "direct" is then exactly each
  # side's endpoint being the other's public mapping (nat-a's learnt map, at the end).
  local mapped=
  [ "$SAME_LAN" = 0 ] || mapped=" mapped_a=$(mapping_of "$ALICE_LAN") mapped_b=$(mapping_of "$BOB_LAN")"
  echo "RESULT nat_a=$NAT_A nat_b=$NAT_B wg=$WG_IMPL ok=$ok ttt_ms=$ttt punch_alice=$ra punch_bob=$rb" \
       "proto=$(proto_name "$V2") ipv6=$IPV6 bob_ask_ms=$b_ask bob_set_ms=$b_set alice_set_ms=$a_set" \
       "alice_endpoint=${a_ep:-none} bob_endpoint=${b_ep:-none} pub_a=$pub_a pub_b=$pub_b server=$srv$mapped"
  [ $ok = 1 ]
}

# --- main --------------------------------------------------------------------------------------------
main() {
  [ $# -ge 1 ] || { usage >&2; exit 2; }
  local cmd=$1; shift
  case $cmd in
    -h|--help|help) usage ;;
    up) cmd_up "$@" ;;
    down) [ $# -eq 0 ] || die "down takes no arguments"; cmd_down ;;
    exec) cmd_exec "$@" ;;
    status) cmd_status ;;
    info) cmd_info ;;
    rebind) cmd_rebind "$@" ;;
    server) cmd_server "$@" ;;
    punch) cmd_punch "$@" ;;
    drop) cmd_drop "$@" ;;
    check) cmd_check "$@" && say "all tools present" ;;
    demo) cmd_demo "$@" ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
  esac
}
main "$@"; exit  # on one line: bash never reads past it, so editing this file mid-run is safe
