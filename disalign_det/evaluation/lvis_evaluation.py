"""Longer than 450 lines: the streaming evaluator, its shard format and the result loading share
private helpers and are kept together.

LVIS evaluation whose memory does not grow with the whole prediction set held in Python objects.

detectron2's :class:`~detectron2.evaluation.LVISEvaluator` keeps every detection of the dataset as a
Python dict (box, score and RLE mask) on every process, pickles the lot to rank 0, dumps it again
with ``torch.save`` and ``json.dumps``, deep-copies it for the mask pass and then lets the LVIS API
build its own structures on top. On LVIS v1 val (19.8k images x 300 detections) that is several
copies of ~6M detections at once (see ``tools/benchmark_lvis_eval.py`` for measured numbers).

:class:`StreamingLVISEvaluator` computes the *same* metrics with a much lower peak:

* ``process()`` converts each image's ``Instances`` exactly as the stock evaluator does
  (``instances_to_coco_json``) and appends them to a per-process *shard file* (compact numpy arrays
  and RLE strings, one pickled frame per image) instead of keeping them.
* ``evaluate()`` gathers the shard *paths* (a few hundred bytes per rank), not the predictions.
* The box pass loads only image id, class, score and box; it is evaluated and dropped before the
  mask pass loads image id, class, score and RLE. Only one pass's results are alive at a time.
* Each pass builds result dicts only for the detections LVIS's federated evaluation looks at:
  after the per-image top-k cut, a detection whose category is neither annotated in its image nor
  listed in the image's ``neg_category_ids`` is discarded by ``LVISEval`` anyway (see
  :func:`load_lvis_results` for why dropping it earlier changes no number). How many detections
  that removes depends on the model (78% of them in the benchmark's synthetic predictions).
* The LVIS API itself is used unchanged, except that :class:`LeanLVISEval` skips the (image,
  category) pairs that have neither ground truth nor detection. The stock ``LVISEval.evaluate``
  creates three dict entries (in ``_gts``, ``_dts`` and ``ious``) for each of the
  ``images x 1203`` pairs (24M on LVIS val) although all but a few are empty; skipping them changes
  no number because ``evaluate_img`` returns ``None`` for an empty pair before reading anything.

With ``backend="fast"`` (``TEST.LVIS_EVAL.BACKEND``) none of the result dicts above is built: the
shards are read into arrays and evaluated by :mod:`.fast_lvis_eval` (bit-identical). With
``background_results_json`` the results json is written by a child process (:mod:`.shards`)
while the metrics are computed.

Multi-process and multi-machine use: every rank writes its shard under ``shard_dir`` (default:
``<output_dir>/lvis_eval_shards`` when ``output_dir`` is a local path, else a fresh temporary
directory) and rank 0 reads the shards directly when it can see them, which is the case for all
ranks of a single machine. For several machines, put ``output_dir`` (or ``shard_dir``) on a
filesystem shared by all of them. When rank 0 cannot see a shard (other host, different path),
that rank sends its shard's bytes through the usual ``comm.gather`` instead: correct, but rank 0
then briefly holds a few copies of those bytes (still far less than the stock evaluator's Python
objects for the same detections).

Differences from the stock evaluator, all deliberate:

* No ``instances_predictions.pth``: it is a ``torch.save`` of every prediction, i.e. another full
  in-memory copy; ``lvis_instances_results.json`` (byte-identical to the stock file) holds the same
  detections. Box proposals (``"proposals"`` outputs) are still kept in memory and evaluated and
  saved exactly as by the stock evaluator.
* A model that predicts nothing: the stock evaluator reports only ``bbox`` (it infers the tasks from
  detections, and there are none). This evaluator reports every task the model's outputs carry
  (``segm`` too when its ``Instances`` have a ``pred_masks`` field, even if empty), each with every
  metric key set to ``float("nan")`` -- NaN as in detectron2's ``_evaluate_predictions_on_lvis``
  for "no predictions", and unlike the LVIS API's ``-1`` (reported ``-100``) which means "no
  ground truth in this group" and must stay distinguishable.
* Keypoints (absent from LVIS) are not stored.
"""

import copy
import itertools
import logging
import os
import pickle
import socket
import tempfile
import uuid
from collections import OrderedDict

import numpy as np
from detectron2.evaluation import LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..compat.features import lvis_evaluator_takes_max_dets
from ..data.dataset_checks import fill_missing_frequency
from ..utils.memory import malloc_trim, release_memory
from . import backends, fixed_ap
from .backends import LVIS_METRICS
from .lean_eval import LeanLVISEval
from .per_class import per_class_ap_from_precision, per_class_table_for
from .shards import FRAME_HEADER, BackgroundResultsWriter, iter_shard, write_results_json

__all__ = [
    "LVIS_METRICS",
    "DEFAULT_MAX_DETS_PER_IMAGE",
    "LeanLVISEval",
    "StreamingLVISEvaluator",
    "evaluate_results_on_lvis",
    "load_lvis_results",
]

logger = logging.getLogger(__name__)

#: Official LVIS limit on detections per image (also the lvis API's default).
DEFAULT_MAX_DETS_PER_IMAGE = 300

_SHARD_SUFFIX = ".lvisdet"


def _nan_metrics():
    return {metric: float("nan") for metric in LVIS_METRICS}


def evaluate_results_on_lvis(
    lvis_gt, lvis_results, iou_type, max_dets_per_image=None, *, backend="lvis", per_class=None
):
    """Evaluate a list of LVIS-format results with the LVIS API, as detectron2 does.

    Same numbers as ``detectron2.evaluation.lvis_evaluation._evaluate_predictions_on_lvis``, but
    without its deep copy of the results for the mask pass: the caller passes, for ``"segm"``,
    results that already lack ``"bbox"`` (so that the LVIS API takes areas from the masks).

    Args:
        lvis_gt (lvis.LVIS): the ground truth.
        lvis_results (list[dict]): results; consumed (the LVIS API adds fields in place).
        iou_type (str): "bbox" or "segm".
        max_dets_per_image (int or None): per-image limit, None for the LVIS default (300), -1
            for none (Fixed AP).
        backend (str): "lvis" (the LVIS API, default), "fast" (:mod:`.fast_lvis_eval`,
            bit-identical) or "faster_coco_eval" (not identical); see :mod:`.backends`.
        per_class (dict or None): filled with {category id: AP in percent, NaN without ground
            truth} when given.

    Returns:
        dict: {metric: score * 100} for :data:`LVIS_METRICS`; NaN for all when there is no result.
    """
    if len(lvis_results) == 0:
        logger.warning(
            "No predictions from the model! Reporting NaN for every %s metric.", iou_type
        )
        return _nan_metrics()
    if max_dets_per_image is None:
        max_dets_per_image = DEFAULT_MAX_DETS_PER_IMAGE
    out = backends.get(backend).evaluate(lvis_gt, lvis_results, iou_type, max_dets_per_image)
    return _report(*out, iou_type, per_class)


def _report(metrics, cat_ids, precision, iou_type, per_class):
    if per_class is not None:
        ap = per_class_ap_from_precision(precision)
        per_class.update({int(c): float(a * 100) for c, a in zip(cat_ids, ap)})
    logger.info("Evaluation results for %s: \n%s", iou_type, create_small_table(metrics))
    return metrics


class _ShardWriter:
    """Appends one image's detections at a time to a shard file.

    Two frames per image: ``(image_id, category_ids, scores, boxes_xywh)`` then ``(mask_size,
    rle_counts)`` (``(None, None)`` without masks). Keeping masks in their own frame lets the box
    pass skip them with a seek instead of unpickling them.
    """

    def __init__(self, path, own_dir):
        self.path = path
        # Temporary directory created for this shard alone (removed with it), or None.
        self.own_dir = own_dir
        self._file = open(path, "wb")
        self.num_images = 0
        self.num_dets = 0
        self.has_mask = False

    def write(self, image_id, coco_results, has_mask_field):
        """Append the ``instances_to_coco_json`` output of one image (category ids final)."""
        self.num_images += 1
        self.has_mask = self.has_mask or has_mask_field
        if not coco_results:
            return
        # float64 holds the float32-derived Python floats of instances_to_coco_json exactly, so
        # tolist() on load gives back the very same floats (and the same JSON text).
        box_frame = (
            image_id,
            np.array([r["category_id"] for r in coco_results], dtype=np.int64),
            np.array([r["score"] for r in coco_results], dtype=np.float64),
            np.array([r["bbox"] for r in coco_results], dtype=np.float64).reshape(-1, 4),
        )
        if "segmentation" in coco_results[0]:
            # One image's masks share their size (one pred_masks tensor per image).
            mask_frame = (
                list(coco_results[0]["segmentation"]["size"]),
                [r["segmentation"]["counts"] for r in coco_results],
            )
        else:
            mask_frame = (None, None)
        for frame in (box_frame, mask_frame):
            data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
            self._file.write(FRAME_HEADER.pack(len(data)))  # length, then the pickle
            self._file.write(data)
        self.num_dets += len(coco_results)

    def close(self):
        """Flush and close; returns the shard's description (see ``StreamingLVISEvaluator``)."""
        if not self._file.closed:
            self._file.close()
        return {
            "path": self.path,
            "own_dir": self.own_dir,
            "size": os.path.getsize(self.path),
            "host": socket.gethostname(),
            "rank": comm.get_rank(),
            "num_images": self.num_images,
            "num_dets": self.num_dets,
            "has_mask": self.has_mask,
        }


class StreamingLVISEvaluator(LVISEvaluator):
    """Drop-in :class:`~detectron2.evaluation.LVISEvaluator` that streams predictions to disk.

    Same constructor, same metrics dict (``{"bbox": {...}, "segm": {...}}`` with the keys of
    :data:`LVIS_METRICS`), same ``lvis_instances_results.json``; see the module docstring for how
    and for the few deliberate differences.

    Extra public methods, for callers that move shards themselves (and for tests):
    :meth:`close_shard` returns this process's shard description, and :meth:`evaluate_shards`
    evaluates a list of such descriptions in this process.
    """

    def __init__(
        self,
        dataset_name,
        tasks=None,
        distributed=True,
        output_dir=None,
        *,
        max_dets_per_image=None,
        shard_dir=None,
        fixed_ap_dets_per_class=0,
        backend="lvis",
        per_class_dir=None,
        per_class_basename="per_class_ap",
        train_counts=None,
        background_results_json=False,
    ):
        """
        Args:
            dataset_name, tasks, distributed, output_dir: as for detectron2's LVISEvaluator.
            max_dets_per_image (int or None): detections kept per image when computing AP (the
                highest-scoring ones); None means the LVIS default, 300. Works whether or not the
                installed detectron2's LVISEvaluator knows this argument.
            shard_dir (str or None): where to write the per-process shard files. Default:
                ``<output_dir>/lvis_eval_shards`` if ``output_dir`` is a local path, else a
                temporary directory. Must be visible to rank 0 for the low-memory gather.
            fixed_ap_dets_per_class (int): K > 0 also reports Fixed AP (top K detections per
                category over the dataset, no per-image cap) as tasks ``"bbox_fixed"`` /
                ``"segm_fixed"``; 0 (default) does not.
            backend (str): "lvis" (default), "fast" or "faster_coco_eval"; see :mod:`.backends`.
            per_class_dir (str or None): where to write the per-class table
                (``<per_class_basename>.json`` / ``.csv``); None writes none.
            train_counts (tuple or None): ``(image_count, instance_count)``, lists indexed by the
                model's contiguous class, for the table's training-frequency columns.
            background_results_json (bool): write ``lvis_instances_results.json`` in a child
                process while the metrics are computed (:mod:`.shards`); local output_dir only.
        """
        takes_max_dets = lvis_evaluator_takes_max_dets()
        kwargs = {"max_dets_per_image": max_dets_per_image} if takes_max_dets else {}
        super().__init__(dataset_name, tasks, distributed, output_dir, **kwargs)
        # Set in every case: older LVISEvaluators neither store nor honour it; we use it ourselves.
        self._max_dets_per_image = max_dets_per_image
        self._logger = logger
        self._shard_dir = shard_dir
        self._writer = None
        self._proposals = []
        self._fixed_k = int(fixed_ap_dets_per_class or 0)
        self._backend = backends.get(backend)
        self._per_class_dir = per_class_dir
        self._per_class_basename = per_class_basename
        self._train_counts = train_counts
        # LVISEval reads every category's "frequency" (a KeyError after all inference otherwise).
        fill_missing_frequency(self._lvis_api, train_counts, dataset_name)
        self._background_json = bool(background_results_json)

        if hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            # LVIS evaluator used on COCO-style categories: map back to the dataset's ids.
            reverse = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
            self._to_dataset_category = reverse.__getitem__
        else:
            # LVIS category ids are 1-based, the model's classes 0-based.
            self._to_dataset_category = lambda c: c + 1

    # ------------------------------------------------------------------ collection
    def _new_shard_writer(self):
        directory, own_dir = self._shard_dir, None
        # Shards are written with plain open(): only a local output_dir can hold them. That
        # directory is shared by all ranks and left in place (removing it could race with another
        # rank already writing its next shard); a temporary directory is per writer, removed.
        if directory is None and self._output_dir and "://" not in self._output_dir:
            directory = os.path.join(self._output_dir, "lvis_eval_shards")
        if directory is None:
            directory = own_dir = tempfile.mkdtemp(prefix="lvis_eval_")
        os.makedirs(directory, exist_ok=True)
        name = f"rank{comm.get_rank():03d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{_SHARD_SUFFIX}"
        return _ShardWriter(os.path.join(directory, name), own_dir)

    def reset(self):
        """Start a new evaluation: drop any unconsumed shard of a previous one."""
        if self._writer is not None:
            info = self._writer.close()
            _remove_shard(info)
        self._writer = None
        self._proposals = []

    def process(self, inputs, outputs):
        """Convert each image's outputs as the stock evaluator does and append them to the shard.

        Args:
            inputs: list of dicts with at least "image_id".
            outputs: list of dicts with "instances" (:class:`Instances`) and/or "proposals".
        """
        if self._writer is None:
            self._writer = self._new_shard_writer()
        for input, output in zip(inputs, outputs):
            image_id = input["image_id"]
            if "instances" in output:
                instances = output["instances"].to(self._cpu_device)
                results = instances_to_coco_json(instances, image_id)
                for result in results:
                    result["category_id"] = self._to_dataset_category(result["category_id"])
                self._writer.write(image_id, results, instances.has("pred_masks"))
            if "proposals" in output:
                # Small (boxes + logits), and the stock proposal evaluation wants them in memory.
                self._proposals.append(
                    {"image_id": image_id, "proposals": output["proposals"].to(self._cpu_device)}
                )

    def close_shard(self):
        """Finish this process's shard and return its description (a small picklable dict)."""
        if self._writer is None:
            self._writer = self._new_shard_writer()
        return self._writer.close()

    # ------------------------------------------------------------------ gathering
    def evaluate(self):
        """Gather shard paths to rank 0 and evaluate there; other ranks return None."""
        info = self.close_shard()
        self._writer = None  # the shard now belongs to whoever evaluates it
        if not self._distributed:
            return self.evaluate_shards([info], self._proposals)

        comm.synchronize()
        infos = comm.all_gather(info)
        proposals = list(itertools.chain(*comm.gather(self._proposals, dst=0)))
        # Rank 0 decides which shards it cannot open; everyone learns the decision.
        unreadable = [i["rank"] for i in infos if not _shard_is_readable(i)]
        unreadable = comm.all_gather(unreadable if comm.is_main_process() else None)[0]
        payload = None
        if info["rank"] in unreadable and not comm.is_main_process():
            with open(info["path"], "rb") as f:
                payload = f.read()
            _remove_shard(info)
        payloads = comm.gather(payload, dst=0)
        if not comm.is_main_process():
            return None

        for i, shard in enumerate(infos):
            if shard["rank"] in unreadable:
                self._logger.warning(
                    "Rank 0 cannot read the LVIS shard of rank %d (%s on %s); it was sent in "
                    "memory instead. Put output_dir/shard_dir on a shared filesystem to avoid "
                    "this.",
                    shard["rank"],
                    shard["path"],
                    shard["host"],
                )
                local = self._new_shard_writer()
                local.close()
                with open(local.path, "wb") as f:
                    f.write(payloads[i])
                payloads[i] = None  # one shard's bytes in memory at a time
                infos[i] = dict(
                    shard, path=local.path, own_dir=local.own_dir, host=socket.gethostname()
                )
        return self.evaluate_shards(infos, proposals)

    # ------------------------------------------------------------------ evaluation
    def evaluate_shards(self, shard_infos, proposals=None):
        """Evaluate the given shards (and proposals) in this process; the shards are deleted.

        Args:
            shard_infos (list[dict]): descriptions from :meth:`close_shard`, in rank order (the
                order of the results file and of detections with tied scores, as in the stock
                gather).
            proposals (list[dict] or None): ``{"image_id", "proposals"}`` dicts, if any.

        Returns:
            dict: {task: {metric: value}} like LVISEvaluator.evaluate().
        """
        try:
            return self._evaluate_shards(list(shard_infos), proposals or [])
        finally:
            for shard in shard_infos:
                _remove_shard(shard)

    def _evaluate_shards(self, shard_infos, proposals):
        num_images = sum(s["num_images"] for s in shard_infos)
        if num_images == 0 and not proposals:
            self._logger.warning("[StreamingLVISEvaluator] Did not receive valid predictions.")
            return {}

        self._results = OrderedDict()
        if proposals:
            self._eval_box_proposals(proposals)
        if num_images > 0:
            self._eval_shard_predictions(shard_infos)
        return copy.deepcopy(self._results)

    def _eval_shard_predictions(self, shard_infos):
        paths = [s["path"] for s in shard_infos]
        has_mask = any(s["has_mask"] for s in shard_infos)
        num_dets = sum(s["num_dets"] for s in shard_infos)
        tasks = self._tasks or (("bbox", "segm") if has_mask else ("bbox",))

        writer = self._write_results_json(paths)
        try:
            if not self._do_evaluation:
                self._logger.info("Annotations are not available for evaluation.")
                return
            self._eval_tasks(paths, tasks, has_mask, num_dets, shard_infos)
        finally:
            if writer is not None:
                self._finish_results_json(writer, paths)  # before the shards go

    def _finish_results_json(self, writer, paths):
        try:
            writer.wait()
        except RuntimeError as e:  # the child failed: the shards are still here, write it now
            self._logger.warning("%s\nWriting %s in this process instead.", e, writer.out_path)
            with PathManager.open(writer.out_path, "w") as f:
                write_results_json(paths, f)
            return
        self._logger.info("Saved results to %s (%s)", writer.out_path, writer.describe())

    def _write_results_json(self, paths):
        """Write ``lvis_instances_results.json`` now, or start a child process writing it (local
        output_dir and ``background_results_json``): returns its handle, or None."""
        if not self._output_dir:
            return None
        PathManager.mkdirs(self._output_dir)
        file_path = os.path.join(self._output_dir, "lvis_instances_results.json")
        if self._background_json and "://" not in file_path:
            try:
                writer = BackgroundResultsWriter(paths, file_path)
                self._logger.info("Saving results to %s (in a child process)", file_path)
                return writer
            except OSError as e:  # cannot start a process here: write it in this one
                self._logger.warning("No child process for the results json (%s)", e)
        self._logger.info("Saving results to %s", file_path)
        with PathManager.open(file_path, "w") as f:
            write_results_json(paths, f)
        return None

    def _eval_tasks(self, paths, tasks, has_mask, num_dets, shard_infos):
        self._logger.info(
            "Evaluating %d predictions on %d images ...",
            num_dets,
            sum(s["num_images"] for s in shard_infos),
        )
        self._per_class = {}
        positions = None
        for fixed in (False, True) if self._fixed_k > 0 else (False,):
            for task in sorted(tasks):
                name = fixed_ap.fixed_task_name(task) if fixed else task
                if num_dets == 0:
                    self._logger.warning("No predictions from the model! %s metrics are NaN.", name)
                    self._results[name] = _nan_metrics()
                    continue
                if task == "segm" and not has_mask:
                    self._logger.warning("Task 'segm' requested but the model predicted no masks.")
                    continue
                if not fixed:
                    self._results[name] = self.evaluate_task(task, paths)
                else:
                    if positions is None:
                        # One selection for both tasks: it depends on the scores only.
                        positions, _ = fixed_ap.select_top_per_class(
                            paths, self._fixed_k, iter_shard
                        )
                    self._results[name] = self._evaluate_fixed_task(task, paths, positions)
                if self._backend.evaluate_shards is not None:
                    malloc_trim()  # few Python objects die: a full collection costs, finds nothing
                else:
                    release_memory()
        self._write_per_class_table()

    def _write_per_class_table(self):
        if not self._per_class_dir or not self._per_class:
            return
        rows = per_class_table_for(
            self._lvis_api, self._per_class, self._train_counts, self._to_dataset_category
        )
        from .per_class import write_per_class_table

        write_per_class_table(self._per_class_dir, rows, self._per_class_basename)

    def _evaluate_fixed_task(self, task, paths, positions):
        """Fixed AP of ``task`` from the kept ``positions`` (see :mod:`.fixed_ap`)."""
        self._logger.info(
            "Fixed AP (%s): %d detections kept (top %d per category), no per-image cap",
            task,
            len(positions),
            self._fixed_k,
        )
        name = fixed_ap.fixed_task_name(task)
        per_class = self._per_class.setdefault(name, {})
        metrics = self._metrics_from_shards(task, paths, -1, positions, per_class)
        if metrics is None:
            results = fixed_ap.load_fixed_ap_results(
                paths,
                task,
                positions,
                self._lvis_api,
                iter_shard,
                _append_results,
                verified_categories(self._lvis_api),
            )
            metrics = evaluate_results_on_lvis(
                self._lvis_api, results, task, -1, backend=self._dict_backend, per_class=per_class
            )
        self._logger.info("Fixed AP results (%s): \n%s", name, create_small_table(metrics))
        return metrics

    @property
    def _dict_backend(self):
        """The backend for result dicts: the reference (LVIS API) where a backend that reads the
        shards declined them (see :class:`.backends.Backend`)."""
        return "lvis" if self._backend.evaluate_shards is not None else self._backend.name

    def _metrics_from_shards(self, task, paths, max_dets, positions, per_class):
        """The backend straight from the shards (no result dicts); None when it does not apply
        (a backend without a shard reader, or one that declined: the caller builds dicts)."""
        if self._backend.evaluate_shards is None:
            return None
        out = self._backend.evaluate_shards(self._lvis_api, paths, task, max_dets, positions)
        return None if out is None else _report(*out, task, per_class)

    def evaluate_task(self, task, paths):
        """Load only the fields ``task`` ("bbox" / "segm") needs from the shard files ``paths`` and
        evaluate them: the metrics dict of that task (public: benchmarks time each task)."""
        per_class = self._per_class.setdefault(task, {})
        max_dets = self._max_dets_per_image
        max_dets = DEFAULT_MAX_DETS_PER_IMAGE if max_dets is None else max_dets
        metrics = self._metrics_from_shards(task, paths, max_dets, None, per_class)
        if metrics is not None:
            return metrics
        results = load_lvis_results(paths, task, self._lvis_api, self._max_dets_per_image)
        return evaluate_results_on_lvis(
            self._lvis_api,
            results,
            task,
            max_dets_per_image=self._max_dets_per_image,
            backend=self._dict_backend,
            per_class=per_class,
        )


def load_lvis_results(paths, task, lvis_gt=None, max_dets_per_image=None):
    """Build the LVIS API's result list for one task from shard files.

    For "bbox": image_id, category_id, bbox, score. The LVIS API would attach a box-shaped polygon
    as "segmentation" to every result lacking one (~0.4 KB each, never read by a box evaluation),
    so a ``None`` placeholder is set instead. For "segm": image_id, category_id, score and the RLE,
    without "bbox" so that areas come from the masks, as in detectron2's mask pass.

    With ``lvis_gt``, the detections that LVIS's federated evaluation is bound to ignore are not
    built at all: after the per-image top-``max_dets_per_image`` cut (done first, exactly as
    ``LVISResults`` does), ``LVISEval._prepare`` drops every detection whose category is neither
    annotated in its image nor in the image's ``neg_category_ids``. Dropping them here instead
    changes no metric: within an image the survivors keep their order (score ties break the same
    way), the order across images never matters (evaluation walks sorted image ids), and a
    detection's id only serves as a non-zero match marker.

    Args:
        paths (list[str]): shard files, in rank order.
        task (str): "bbox" or "segm".
        lvis_gt (lvis.LVIS or None): ground truth that enables the filtering above.
        max_dets_per_image (int or None): the limit LVISResults will apply (None: 300).
    """
    with_masks = task == "segm"
    selector = None
    if lvis_gt is not None:
        selector = _FederatedSelector(lvis_gt, max_dets_per_image)
        repeated = _repeated_images(paths)
    results = []
    pending = {}  # repeated image id -> its records, in gather order
    for path in paths:
        for image_id, cats, scores, boxes, size, counts in iter_shard(path, with_masks):
            if with_masks and counts is None:
                continue  # an image without masks has nothing for the mask pass
            record = (cats.tolist(), scores.tolist(), boxes.tolist(), size, counts)
            if selector is None:
                _append_results(results, image_id, record, range(len(record[0])), with_masks)
            elif image_id in repeated:
                # Processed more than once (detectron2's samplers never do that): the top-k cut
                # must see all of the image's detections, in the order the stock gather has them.
                pending.setdefault(image_id, []).append(record)
            else:
                _append_results(results, image_id, record, selector(image_id, record), with_masks)
    for image_id, records in pending.items():
        cats, scores, boxes, size, counts = zip(*records)
        merged = (_concat(cats), _concat(scores), _concat(boxes), size[0], _concat(counts))
        _append_results(results, image_id, merged, selector(image_id, merged), with_masks)
    if not results and selector is not None and selector.spare is not None:
        # All filtered out: the stock path would still evaluate (AP 0 where there is ground
        # truth) instead of finding no result at all. Hand over one detection it will ignore.
        image_id, record, k = selector.spare
        _append_results(results, image_id, record, [k], with_masks)
    if selector is not None:
        logger.info(
            "%s pass: %d of %d detections are evaluated (after the top-%d cut, in categories "
            "verified for their image); only those were loaded",
            task,
            selector.num_kept,
            selector.num_seen,
            selector.limit,
        )
    return results


def _concat(lists):
    return None if lists[0] is None else [x for values in lists for x in values]


def _append_results(results, image_id, record, indices, with_masks):
    cats, scores, boxes, size, counts = record
    for k in indices:
        if with_masks:
            seg = {"size": size, "counts": counts[k]}
            result = {"image_id": image_id, "category_id": cats[k], "segmentation": seg}
            result["score"] = scores[k]
        else:
            result = {"image_id": image_id, "category_id": cats[k], "bbox": boxes[k]}
            result["score"] = scores[k]
            result["segmentation"] = None
        results.append(result)


def _repeated_images(paths):
    """Image ids with more than one shard record (i.e. processed more than once)."""
    seen, repeated = set(), set()
    for path in paths:
        for image_id, *_ in iter_shard(path, with_masks=False):
            (repeated if image_id in seen else seen).add(image_id)
    return repeated


def verified_categories(lvis_gt):
    """{image id: set of the category ids ``LVISEval._prepare`` evaluates in that image}.

    The negative ones plus those of the ground truth it loads (a known category and
    0 < area < inf, ``get_ann_ids``' default).
    """
    verified = {img["id"]: set(img["neg_category_ids"]) for img in lvis_gt.load_imgs(None)}
    known = set(lvis_gt.get_cat_ids())
    for ann in lvis_gt.load_anns(None):
        if ann["category_id"] in known and 0 < ann["area"] < float("inf"):
            verified[ann["image_id"]].add(ann["category_id"])
    return verified


class _FederatedSelector:
    """The detections of an image that LVISResults keeps and LVISEval then evaluates.

    See :func:`load_lvis_results`. ``spare`` remembers one dropped detection.
    """

    def __init__(self, lvis_gt, max_dets_per_image):
        self.limit = max_dets_per_image
        if self.limit is None:
            self.limit = DEFAULT_MAX_DETS_PER_IMAGE
        self.spare = None
        self.num_seen = 0
        self.num_kept = 0
        self._verified = verified_categories(lvis_gt)

    def __call__(self, image_id, record):
        """Indices into ``record``'s detections, in the order LVISResults would keep them."""
        cats, scores = record[0], record[1]
        indices = range(len(scores))
        if 0 <= self.limit < len(scores):
            # LVISResults.limit_dets_per_image: stable sort by decreasing score, then the cut.
            indices = sorted(indices, key=scores.__getitem__, reverse=True)[: self.limit]
        verified = self._verified.get(image_id)
        if verified is None:
            # Not a ground-truth image: LVISResults will reject it itself.
            self.num_seen += len(scores)
            self.num_kept += len(indices)
            return list(indices)
        kept = [k for k in indices if cats[k] in verified]
        self.num_seen += len(scores)
        self.num_kept += len(kept)
        if self.spare is None and len(kept) < len(indices):
            self.spare = (image_id, record, next(k for k in indices if cats[k] not in verified))
        return kept


def _shard_is_readable(info):
    """Can this process open the shard described by ``info``, with the size its writer saw?"""
    try:
        return os.path.getsize(info["path"]) == info["size"]
    except OSError:
        return False


def _remove_shard(info):
    """Delete a shard, and the directory the evaluator created for it once that is empty."""
    try:
        os.remove(info["path"])
    except FileNotFoundError:
        return
    if info.get("own_dir"):
        try:
            os.rmdir(info["own_dir"])
        except OSError:
            pass
