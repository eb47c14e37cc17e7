"""The evaluation harness around the algorithm: data sets, prompts, the answer judge, the methods (one table), run
storage and the runner, reports and the ``latentseek`` CLI.

The algorithm (:mod:`latentseek`) never imports this package; the harness builds on it.
"""
