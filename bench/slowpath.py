"""Slow-path rate: ICMP echo requests to a balancer address, answered by the AF_XDP slow path in Python.

A client in the lab sends echo requests as fast as it can for a few seconds from several raw-socket
senders while one receiver counts the replies; the rate reported is replies per second, which the Python
client also bounds (printed beside it: requests sent per second).
"""

from __future__ import annotations

import json

CLIENT = r"""
import json, os, socket, struct, sys, time, threading
vip, secs, procs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
recv = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
recv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20); recv.settimeout(0.5)
got = [0]; stop = [False]
def rx():
    while not stop[0]:
        try:
            d = recv.recv(200)
        except OSError:
            continue
        if d[(d[0] & 15) * 4] == 0:
            got[0] += 1
t = threading.Thread(target=rx); t.start()
pids = []
for p in range(procs):
    pid = os.fork()
    if pid == 0:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); sent = 0
        end = time.monotonic() + secs
        while time.monotonic() < end:
            body = struct.pack('!BBHHH', 8, 0, 0, p, sent & 0xffff) + b'x' * 18
            body = body[:2] + struct.pack('!H', csum(body)) + body[4:]
            try:
                s.sendto(body, (vip, 0)); sent += 1
            except OSError:
                pass
        os.write(1, (json.dumps({'sent': sent}) + '\n').encode()); os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
time.sleep(0.5); stop[0] = True; t.join()
print(json.dumps({'answered': got[0]}))
"""


def run(quick: bool, log) -> dict:
    from hdslb.lab.topology import OneArm

    secs = 2.0 if quick else 5.0
    lab = OneArm(n_servers=1)
    lab.setup()
    try:
        import sys
        from pathlib import Path

        exe = Path(sys.executable).parent / "hdslb-ctl"
        ctl = [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.hdslb_ctl"]
        dpip = [str(exe.parent / "dpip")] if exe.exists() else [sys.executable, "-m", "cli.dpip"]
        lab.lb_run(ctl + ["up", "veth-lb0", "--xdp-mode", "native", "--slowpath", "--pin-root", str(lab.pin_dir.parent),
                          "--api-listen", "off", "--log-file", str(lab.workdir / "hdslbd.log")], timeout=120)
        lab.lb_run(dpip + ["addr", "add", "192.168.100.100/24", "dev", "veth-lb0"])
        r = lab.client_run(["python3", "-c", CLIENT, "192.168.100.100", str(secs), "2"], timeout=secs + 30)
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
        sent = sum(x.get("sent", 0) for x in lines)
        answered = sum(x.get("answered", 0) for x in lines)
        out = {"seconds": secs, "sent_per_s": round(sent / secs), "answered_per_s": round(answered / secs),
               "answered_share": round(answered / sent, 3) if sent else 0.0}
        log(f"slow path: {out['answered_per_s']} echo replies/s answered from Python "
            f"({out['sent_per_s']} requests/s sent, {out['answered_share']:.0%} answered)")
        lab.lb_run(ctl + ["down"], check=False, timeout=60)
        return out
    finally:
        lab.teardown()
