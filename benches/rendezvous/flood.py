"""Step time of a 2-rank CPU training job with and without a connection flood on its
rendezvous port, run after run on the same machine (docs/benchmarks.md). The flood keeps
IDLE silent TCP connections open (reopening those the rendezvous closes) and sends junk
on a fresh connection every few milliseconds, from the first launcher line to the job's
end, to loopback only and bounded in count. Prints the mean step time of both runs and
their ratio (goal: the flood costs under 5%).

The flooding client is the attacker's program: on a real cluster it runs on another
machine. Here it shares the ranks' cores, so it runs at idle priority (SCHED_IDLE: it gets
a core only when neither rank wants it) and its own CPU does not count against rsdeep;
its connections still reach the launcher, whose cost is what is measured. `--pairs N`
alternates N quiet and N flooded runs and reports the medians.

  flood.py --rsdeep BIN --tokenizer DIR --data FILE [--steps 40] [--idle 2000] [--pairs 3]"""
import argparse, json, os, re, socket, subprocess, tempfile, threading, time

MAX_CONNECTIONS = 200_000  # bound on connections opened by one flood


def flood(port, stop, idle, counter):
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
    sockets, checked = [], 0.0
    while not stop.is_set() and counter[0] < MAX_CONNECTIONS:
        if time.monotonic() - checked < 0.5:  # junk only, between checks of the idle set
            junk_once(port, counter)
            time.sleep(0.01)
            continue
        checked = time.monotonic()
        alive = []
        for s in sockets:  # drop the ones the server closed
            try:
                s.setblocking(False)
                if s.recv(1, socket.MSG_PEEK) == b"":
                    s.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                continue
            alive.append(s)
        sockets = alive
        while len(sockets) < idle and counter[0] < MAX_CONNECTIONS:
            try:
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=1))
                counter[0] += 1
            except OSError:
                break
    for s in sockets:
        s.close()


def junk_once(port, counter):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as junk:
            junk.sendall(b"\x16\x03\x01 not a rendezvous call\r\n\r\n" * 4)
            counter[0] += 1
    except OSError:
        pass


def cpu_seconds(pid):
    """utime + stime of `pid` so far (0 once it is gone)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def run(a, with_flood):
    out = tempfile.mkdtemp(prefix="flood-bench-")
    cmd = [a.rsdeep, "--device", "cpu", "--num_procs", "2", "--master_port", "0", "configs/pretrain.json",
           "--tokenizer_name", a.tokenizer, "--train_files", a.data, "--max_steps", str(a.steps),
           "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--output_dir", out]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stop, counter, threads = threading.Event(), [0], []
    for line in proc.stderr:
        match = re.search(r"rendezvous 127\.0\.0\.1:(\d+)", line)
        if match:
            if with_flood:
                threads.append(threading.Thread(target=flood, args=(int(match.group(1)), stop, a.idle, counter)))
                threads[-1].start()
            break
    launcher_cpu = 0.0
    for _ in proc.stderr:  # drain, sampling the launcher's CPU time
        launcher_cpu = max(launcher_cpu, cpu_seconds(proc.pid))
    code = proc.wait()
    stop.set()
    for t in threads:
        t.join()
    if code != 0:
        raise SystemExit(f"rsdeep exited {code} ({'with' if with_flood else 'without'} flood)")
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
    elapsed = [r["elapsed_s"] for r in rows]
    steps = [b - a_ for a_, b in zip(elapsed[2:], elapsed[3:])]  # after warm-up
    return sum(steps) / len(steps), counter[0], launcher_cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rsdeep", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--idle", type=int, default=2000)
    p.add_argument("--pairs", type=int, default=1)
    a = p.parse_args()
    quiet, flooded = [], []
    for pair in range(a.pairs):
        quiet.append(run(a, False))
        flooded.append(run(a, True))
        print(f"pair {pair + 1}: mean step {quiet[-1][0] * 1e3:.1f} ms without, "
              f"{flooded[-1][0] * 1e3:.1f} ms with {flooded[-1][1]} flood connections", flush=True)
    median = lambda runs, i: sorted(r[i] for r in runs)[len(runs) // 2]
    q, f = median(quiet, 0), median(flooded, 0)
    print(f"median mean step {q * 1e3:.1f} ms without a flood, {f * 1e3:.1f} ms with "
          f"{median(flooded, 1)} flood connections ({a.idle} kept idle): ratio {f / q:.3f}")
    print(f"launcher CPU {median(quiet, 2):.2f} s without, {median(flooded, 2):.2f} s with the flood "
          f"(the flooding client runs at idle priority on the same cores and is not counted)")


if __name__ == "__main__":
    main()
