#!/usr/bin/env python3
"""Instructions per element of each kernel's hot loop, read from its SASS (`cuobjdump -sass`).

A kernel's hot loop is the loop (a backward branch and its target) holding the most unpredicated
`MUFU.EX2`: every kernel that touches a logit computes one exp2 of it, so the unpredicated EX2s of
one trip through the loop are the elements it handles (a predicated EX2 is the online logsumexp's
rare rescale). Instructions per element = the loop body's instructions (NOPs excluded, every
instruction counted once, rarely taken branches inside the body included) / those elements: a static
count, the figure that bounds the issue rate a bandwidth-bound loop needs.

Usage: sass_loop_counts.py CUOBJDUMP [--bounds FILE] CUBIN...
Prints one line per kernel with an EX2 loop (with --bounds: per bounded kernel; lines `kernel
max_per_element`), and exits 1 when a kernel exceeds its bound or a bounded kernel has no such loop.
"""

import re
import subprocess
import sys

FUNCTION = re.compile(r"^\s*Function : (\S+)")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def parse(sass_text):
    """{kernel: [(address, predicated, opcode, operands)]} in address order."""
    kernels, current = {}, None
    for line in sass_text.splitlines():
        m = FUNCTION.match(line)
        if m:
            current = m.group(1)
            kernels[current] = []
            continue
        m = INSTRUCTION.search(line)
        if m and current is not None:
            kernels[current].append((int(m.group(1), 16), m.group(2) is not None, m.group(3), m.group(4)))
    return kernels


def hot_loop(instructions):
    """(first address, last address, instructions, elements) of the loop with most unpredicated EX2."""
    best = None
    for address, _, opcode, operands in instructions:
        if not opcode.startswith("BRA"):
            continue
        target = BRANCH_TARGET.search(operands)
        if target is None or int(target.group(1), 16) > address:
            continue
        start = int(target.group(1), 16)
        body = [i for i in instructions if start <= i[0] <= address and not i[2].startswith("NOP")]
        elements = sum(1 for _, predicated, opcode, _ in body if opcode == "MUFU.EX2" and not predicated)
        if elements == 0:
            continue
        key = (elements, -len(body))
        if best is None or key > best[0]:
            best = (key, (start, address, len(body), elements))
    return None if best is None else best[1]


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cuobjdump, rest = argv[0], argv[1:]
    bounds = {}
    if rest[0] == "--bounds":
        with open(rest[1]) as f:
            for line in f:
                line = line.split("#")[0].split()
                if len(line) == 2:
                    bounds[line[0]] = float(line[1])
        rest = rest[2:]
    seen, failures = set(), []
    print(f"{'kernel':<44} {'loop':>13} {'instr':>6} {'elems':>6} {'instr/elem':>10} {'bound':>6}")
    for cubin in rest:
        sass = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
        for kernel, instructions in sorted(parse(sass).items()):
            if bounds and kernel not in bounds:
                continue  # the loss kernels' loops run per example, not per logit
            loop = hot_loop(instructions)
            if loop is None:
                continue
            seen.add(kernel)
            start, end, count, elements = loop
            per_element = count / elements
            bound = bounds.get(kernel)
            mark = ""
            if bound is not None and per_element > bound:
                failures.append(f"{kernel}: {per_element:.2f} instructions per element > bound {bound}")
                mark = "  <-- over"
            print(f"{kernel:<44} {start:#6x}-{end:#6x} {count:>6} {elements:>6} {per_element:>10.2f} "
                  f"{'-' if bound is None else bound:>6}{mark}")
    for kernel in sorted(set(bounds) - seen):
        failures.append(f"{kernel}: bounded but no EX2 loop found in its SASS")
    for failure in failures:
        print(f"sass_loop_counts: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
