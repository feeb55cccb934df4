"""The benchmarks behind ``tools/benchmark_longtail.py`` and ``tools/benchmark_speed.py``.

Modules, in the order the long-tail benchmark uses them:

* :mod:`.plan`: stage-one recipes, methods, presets and the runs of a benchmark;
* :mod:`.run`: runners (child process or in process), reuse of finished runs, the scheduler;
* :mod:`.progress`: runs done / total and ETA;
* :mod:`.results`: per-seed summaries, tables, per-class AP and the detection-budget evaluation;
* :mod:`.stats`: statistics over seeds and their formatting;
* :mod:`.plot` and :mod:`.outputs`: the per-class plot and the written md / json / png;
* :mod:`.report`: the metrics tables the README and the tools print;
* :mod:`.longtail`: everything above from the plan to the outputs, and the command line.

Nothing here is imported by the model code; the tools are thin command lines over these modules.
"""
