# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Fast parser of the replay text stream (format in matching/replay.py) into run_batch buffers.

It accepts exactly what matching.replay.parse_line accepts (tests compare the two): ASCII
integers with an optional leading '-', fields separated by spaces or tabs, blank lines skipped,
'\\r\\n' line ends allowed. Parsing 3 M lines in Python takes seconds; here it takes a fraction
of one, which keeps `carbonx replay` on large streams snappy (parsing is never timed).
"""

from array import array

from libc.stdint cimport int64_t, uint64_t

# Compile-time constants (kept in step with matching/events.py; the differential tests would
# catch any drift because every event and code is compared with the reference book).
cdef enum:
    OP_SUBMIT = 1
    OP_CANCEL = 2
    OP_MOVE = 3
    OP_REDUCE = 4
    STRIDE = 8
    MAX_FIELDS = 8


cdef inline bint _space(unsigned char c) noexcept nogil:
    return c == 32 or c == 9 or c == 13


def parse(const unsigned char[::1] data not None, Py_ssize_t pos, Py_ssize_t max_commands,
          Py_ssize_t first_line=1):
    """Parse up to `max_commands` commands from data[pos:].

    Returns (buffer, next_pos, next_line). Raises ValueError("line N: ...") on a bad line.
    """
    cdef Py_ssize_t n = data.shape[0], line_no = first_line, start, k, nf, count = 0
    cdef int64_t f[MAX_FIELDS]
    cdef int64_t v
    cdef uint64_t mag
    cdef bint neg, any_digit
    cdef unsigned char c, kind
    out = array("q", bytes(max_commands * STRIDE * 8))
    cdef int64_t[::1] o = out
    cdef int64_t* w
    while pos < n and count < max_commands:
        start = pos
        # Skip leading blanks; a blank line is skipped whole.
        while pos < n and _space(data[pos]):
            pos += 1
        if pos >= n:
            break
        if data[pos] == 10:
            pos += 1
            line_no += 1
            continue
        kind = data[pos]
        pos += 1
        if pos < n and not _space(data[pos]) and data[pos] != 10:
            raise ValueError(f"line {line_no}: unknown command")
        nf = 0
        while True:
            while pos < n and _space(data[pos]):
                pos += 1
            if pos >= n or data[pos] == 10:
                break
            if nf == MAX_FIELDS:
                raise ValueError(f"line {line_no}: too many fields")
            neg = False
            if data[pos] == 45:  # '-'
                neg = True
                pos += 1
            mag = 0
            any_digit = False
            while pos < n:
                c = data[pos]
                if c < 48 or c > 57:
                    break
                any_digit = True
                if mag > 922337203685477580ULL:
                    raise ValueError(f"line {line_no}: number out of range")
                mag = mag * 10 + (c - 48)
                pos += 1
            if not any_digit or (pos < n and not _space(data[pos]) and data[pos] != 10):
                raise ValueError(f"line {line_no}: not an integer")
            if mag > (9223372036854775808ULL if neg else 9223372036854775807ULL):
                raise ValueError(f"line {line_no}: number out of range")
            v = -<int64_t>mag if neg else <int64_t>mag
            f[nf] = v
            nf += 1
        if pos < n:
            pos += 1  # the newline
        w = &o[count * STRIDE]
        for k in range(STRIDE):
            w[k] = 0
        if kind == 80 and nf == 6:  # P id uid side type price qty
            if f[2] < 0 or f[2] > 1 or f[3] < 0 or f[3] > 2:
                raise ValueError(f"line {line_no}: bad side or type")
            w[0] = OP_SUBMIT
            w[1] = f[0]
            w[2] = f[1]
            w[3] = f[2] | (f[3] << 2)
            w[4] = f[4]
            w[5] = f[5]
        elif kind == 77 and nf == 3:  # M id uid price
            w[0] = OP_MOVE
            w[1] = f[0]
            w[2] = f[1]
            w[4] = f[2]
        elif kind == 67 and nf == 2:  # C id uid
            w[0] = OP_CANCEL
            w[1] = f[0]
            w[2] = f[1]
        elif kind == 82 and nf == 3:  # R id uid reduce_by
            w[0] = OP_REDUCE
            w[1] = f[0]
            w[2] = f[1]
            w[5] = f[2]
        else:
            raise ValueError(f"line {line_no}: cannot read command")
        count += 1
        line_no += 1
    del o
    del out[count * STRIDE:]
    return out, pos, line_no
