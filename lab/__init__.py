"""The lab: experiments run on the library, from a checkout of this repository.

Not part of the installed ``disalign_det`` package (``setup.py`` installs only that): these modules
run the repository's configs and ``tools/train_net.py``, and write results and reports. Nothing in
``disalign_det`` imports them. Running experiments and aggregating them are separate modules:

Running (the long-tail benchmark behind ``tools/benchmark_longtail.py``):

* :mod:`.plan`: stage-one recipes, methods, presets and the runs of a benchmark;
* :mod:`.run`: runners (child process or in process), reuse of finished runs, the scheduler;
* :mod:`.progress`: runs done / total and ETA;

Aggregating:

* :mod:`.results`: per-seed summaries, tables, per-class AP and the detection-budget evaluation;
* :mod:`.stats`: statistics over seeds and their formatting (also used by
  ``tools/benchmark_speed.py``);
* :mod:`.plot` and :mod:`.outputs`: the per-class plot and the written md / json / png;
* :mod:`.report`: the metrics tables the tools print (``tools/demo.py`` too);

and :mod:`.longtail`: everything above from the plan to the outputs, and the command line.
"""
