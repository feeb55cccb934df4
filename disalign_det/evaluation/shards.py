"""The streaming LVIS evaluator's shard files: reading them, and writing the results json from them.

A shard holds one process's detections, two frames per image (an 8-byte little-endian length, then
that many bytes of pickle): ``(image_id, category_ids, scores, boxes_xywh)`` then ``(mask_size,
rle_counts)`` (``(None, None)`` without masks). The writer is ``_ShardWriter`` in
:mod:`.lvis_evaluation`.

This module imports nothing but the standard library (numpy comes with the pickles), so that it
also runs as a script: :class:`BackgroundResultsWriter` starts ``python shards.py OUT SHARD...`` to
write ``lvis_instances_results.json`` in a child process while the parent computes the metrics.
Writing that file is bound by Python's float formatting (five ``repr`` per detection, ~1 s per
million floats here: ~30 s on LVIS val) and depends on nothing the metrics compute, so on a
machine with a spare core it costs no wall time.
"""

import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile

__all__ = ["FRAME_HEADER", "BackgroundResultsWriter", "iter_shard", "write_results_json"]

#: Header of every frame: the pickle's length.
FRAME_HEADER = struct.Struct("<Q")


def read_frame(f, skip=False):
    """The next frame of an open shard: the unpickled object, ``()`` when skipped, None at EOF."""
    header = f.read(FRAME_HEADER.size)
    if not header:
        return None
    if len(header) != FRAME_HEADER.size:
        raise IOError(f"Truncated LVIS evaluation shard {f.name}")
    (length,) = FRAME_HEADER.unpack(header)
    if skip:
        f.seek(length, os.SEEK_CUR)
        return ()
    return pickle.loads(f.read(length))


def iter_shard(path, with_masks):
    """Yield ``(image_id, category_ids, scores, boxes_xywh, mask_size, rle_counts)`` per image.

    With ``with_masks=False`` the mask frames are skipped unread and the last two items are None.
    """
    with open(path, "rb") as f:
        while True:
            box_frame = read_frame(f)
            if box_frame is None:
                return
            if with_masks:
                mask_size, counts = read_frame(f)
            else:
                read_frame(f, skip=True)
                mask_size, counts = None, None
            yield box_frame + (mask_size, counts)


def write_results_json(paths, f):
    """Write the shards as detectron2's ``lvis_instances_results.json``, one image at a time.

    Byte-identical to ``json.dumps(list_of_results)``: same record and key order, same separators.
    """
    f.write("[")
    first = True
    for path in paths:
        for image_id, cats, scores, boxes, size, counts in iter_shard(path, with_masks=True):
            records = []
            rows = zip(cats.tolist(), boxes.tolist(), scores.tolist())
            for k, (c, b, s) in enumerate(rows):
                record = {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                if counts is not None:
                    record["segmentation"] = {"size": list(size), "counts": counts[k]}
                records.append(record)
            # One encoder call per image; a JSON list is "[" + ", ".join(items) + "]", so the
            # inner text of each image's list concatenates to the text of the whole list.
            if not first:
                f.write(", ")
            f.write(json.dumps(records)[1:-1])
            first = False
    f.write("]")


class BackgroundResultsWriter:
    """Writes the results json from the shards in a child process (this file run as a script).

    The file appears under its name only once complete (written as ``<name>.tmp<pid>``, then
    renamed); :meth:`wait` raises if the child failed, with its error output. The shards must stay
    in place until :meth:`wait` returns.
    """

    def __init__(self, paths, out_path):
        self.out_path = out_path
        self._tmp = f"{out_path}.tmp{os.getpid()}"
        #: ``resource.struct_rusage`` of the finished child (its CPU time; its ``ru_maxrss``
        #: includes the parent's pages shared before exec, see ``peak_mb``).
        self.rusage = None
        #: Peak RSS in MB of the child's own program (its VmHWM, which it reports on exit).
        self.peak_mb = None
        cmd = [sys.executable, os.path.abspath(__file__), self._tmp] + list(paths)
        # Error output to a file, not a pipe: nothing can block the child while we wait.
        self._err = tempfile.TemporaryFile()
        # Run as a script, this file's folder would come first on the child's sys.path, where a
        # sibling module could shadow a standard one; PYTHONSAFEPATH (Python >= 3.11) keeps it off.
        env = dict(os.environ, PYTHONSAFEPATH="1")
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err, env=env)

    def wait(self):
        """Wait for the child; rename its file into place or raise ``RuntimeError``."""
        _, status, self.rusage = os.wait4(self._proc.pid, 0)  # wait4: this child's own usage
        code = os.waitstatus_to_exitcode(status)
        self._proc.returncode = code
        self._err.seek(0)
        tail = self._err.read()[-2000:].decode(errors="replace")
        self._err.close()
        for line in tail.splitlines():
            if line.startswith(_PEAK_PREFIX):
                self.peak_mb = int(line[len(_PEAK_PREFIX) :]) / 1024
        if code != 0:
            try:
                os.remove(self._tmp)
            except OSError:
                pass
            raise RuntimeError(
                f"Writing {self.out_path} in a child process failed (exit {code}); set "
                "TEST.LVIS_EVAL.BACKGROUND_RESULTS_JSON False to write it in-process. Its error "
                f"output:\n{tail}"
            )
        os.replace(self._tmp, self.out_path)

    def describe(self):
        """``"<cpu> s CPU, <peak> MB peak"`` of the finished child."""
        r = self.rusage
        peak = "?" if self.peak_mb is None else f"{self.peak_mb:.0f}"
        return f"child process: {r.ru_utime + r.ru_stime:.1f} s CPU, {peak} MB peak RSS"


_PEAK_PREFIX = "disalign-shards peak_rss_kb="


def _peak_rss_kb():
    # The twin of disalign_det.utils.memory.peak_rss_mb: the child cannot import the package
    # (its __init__ pulls in detectron2 and torch, seconds of start-up for a json writer).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:  # not Linux
        pass
    return None


def _main(argv):
    out_path, paths = argv[0], argv[1:]
    with open(out_path, "w") as f:
        write_results_json(paths, f)
    peak = _peak_rss_kb()
    if peak is not None:
        sys.stderr.write(f"{_PEAK_PREFIX}{peak}\n")


if __name__ == "__main__":
    _main(sys.argv[1:])
