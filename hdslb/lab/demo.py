"""`make demo`: build the one-arm lab, run the DPVS quick start against real nginx servers, show the result."""

from __future__ import annotations

import collections
import shlex
import subprocess
import sys
from pathlib import Path

from hdslb.lab.servers import start_nginx
from hdslb.lab.topology import OneArm

BIN = Path(sys.executable).parent


def _tool(name: str, module: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def main() -> int:
    with OneArm(n_servers=2) as lab:
        print(lab.describe(), "\n")
        start_nginx(lab)

        def lb(tool: list[str], *args: str) -> str:
            shown = " ".join([Path(tool[-1]).name if len(tool) == 1 else tool[-1].split(".")[-1], *args])
            print(f"lb# {shown}")
            r = lab.lb_run(tool + list(args), check=False, timeout=120)
            out = (r.stdout + r.stderr).rstrip()
            if out:
                print(out)
            if r.returncode != 0:
                raise SystemExit(f"demo: `{shown}` failed with status {r.returncode}")
            return r.stdout

        ctl, ipvsadm, dpip = _tool("hdslb-ctl", "cli.hdslb_ctl"), _tool("ipvsadm", "cli.ipvsadm"), _tool("dpip", "cli.dpip")
        vip, laddr = "192.168.100.100", "192.168.100.200"
        try:
            lb(ctl, "up", "veth-lb0", "--xdp-mode", "native", "--pin-root", str(lab.pin_dir.parent),
               "--log-file", str(lab.workdir / "hdslbd.log"))
            lb(dpip, "addr", "add", f"{vip}/24", "dev", "veth-lb0")
            lb(ipvsadm, "-A", "-t", f"{vip}:80", "-s", "rr")
            for rs in lab.server_ips:
                lb(ipvsadm, "-a", "-t", f"{vip}:80", "-r", f"{rs}:80", "-b")
            lb(ipvsadm, "--add-laddr", "-z", laddr, "-t", f"{vip}:80", "-F", "veth-lb0")

            n = 20
            print(f"\nclient# for i in $(seq {n}); do curl -s http://{vip}/; done")
            r = lab.client_run(["bash", "-c", f"for i in $(seq {n}); do curl -s -m 5 http://{vip}/ || echo FAIL; done"],
                               check=False, timeout=120)
            lines = r.stdout.splitlines()
            for line in lines[:6]:
                print(f"  {line}")
            print(f"  ... ({len(lines)} responses)")
            per = collections.Counter(line.split()[0] for line in lines if line != "FAIL")
            print(f"  answered by: {dict(per)}; failures: {lines.count('FAIL')}\n")

            lb(ipvsadm, "-Ln")
            lb(ipvsadm, "-Ln", "--stats")
            lb(ipvsadm, "-G")
            lb(dpip, "route", "show")
            lb(ctl, "status")
        finally:
            lab.lb_run(ctl + ["down"], check=False, timeout=60)
            print("lb# hdslb-ctl down")
        ok = lines.count("FAIL") == 0 and len(per) == len(lab.server_ips)
        print("\ndemo:", "OK — every request was balanced across the real servers" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
