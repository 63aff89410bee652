"""Catching what a program sends to the journal, without journald: run it under
`unshare -m` with a private /run/systemd/journal whose socket this script reads (the journal's
native protocol), then print {"rc": exit status, "entries": [fields...]} as JSON.

    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-c", JOURNAL_CATCHER, PROGRAM...]

SIGTERM to the catcher is passed on to the program (a daemon is stopped that way).
"""

JOURNAL_CATCHER = r"""
import json, os, signal, socket, subprocess, sys
os.makedirs("/run/systemd/journal", exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/systemd/journal"], check=True)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/run/systemd/journal/socket")
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)  # stderr: the caller's
signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))  # stop a daemon through us
rc = proc.wait()
sock.setblocking(False)
entries = []
while True:
    try:
        data = sock.recv(1 << 20)
    except BlockingIOError:
        break
    fields, i = {}, 0
    while i < len(data):  # the journal's native protocol: KEY=value\n, or KEY\n<le64 size><value>\n
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            i = nl + 1
        else:
            k, size = line, int.from_bytes(data[nl + 1:nl + 9], "little")
            v, i = data[nl + 9:nl + 9 + size], nl + 9 + size + 1
        fields[k.decode()] = v.decode(errors="replace")
    entries.append(fields)
print(json.dumps({"rc": rc, "entries": entries}))
"""


