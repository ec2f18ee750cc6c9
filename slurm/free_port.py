"""Print a TCP port nobody on this machine listens on (or holds in TIME_WAIT), drawn at random.

    python3 slurm/free_port.py [LOW HIGH]     # default 20000 32768 (HIGH excluded)

slurm/launch.sh runs it on the batch node, the first node of the job, to choose the rendezvous
port: the default range lies below Linux's ephemeral ports, where outgoing connections take theirs.
Standard library only: it runs with the nodes' python3, outside any virtualenv or container.
Exit status 1 when no port of the range is free, 2 for a bad range.
"""

import random
import socket
import sys


def is_free(port: int) -> bool:
    """Whether a bind to every interface succeeds (without SO_REUSEADDR, so TIME_WAIT counts as taken)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def main(argv: list[str]) -> int:
    try:
        low, high = (int(a) for a in argv) if argv else (20000, 32768)
    except ValueError:
        low = high = 0
    if not 1 <= low < high <= 65536:
        print(f"usage: free_port.py [LOW HIGH] with 1 <= LOW < HIGH <= 65536, not {' '.join(argv)}", file=sys.stderr)
        return 2
    candidates = range(low, high)
    for port in random.sample(candidates, min(len(candidates), 500)):
        if is_free(port):
            print(port)
            return 0
    print(f"free_port.py: no free port among {min(len(candidates), 500)} tried in [{low}, {high})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
