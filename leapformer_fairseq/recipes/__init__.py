"""The recipes behind ``scripts/`` (docs/recipes.md); not imported by ``leapformer_fairseq``
itself, so fairseq's ``--user-dir`` does not pull in their dependencies.

- :mod:`~leapformer_fairseq.recipes.common`: logs, commands that stop a recipe naming the step,
  atomic outputs, checked text input, SimulEval runs and the results table;
- :mod:`~leapformer_fairseq.recipes.config`: named training configurations (``configs/``),
  their overrides and the record of a run;
- :mod:`~leapformer_fairseq.recipes.t2t`: the text recipe (``scripts/t2t_recipe.py``);
- :mod:`~leapformer_fairseq.recipes.s2t`: the speech recipe (``scripts/s2t_recipe.py``);
- :mod:`~leapformer_fairseq.recipes.mustc`: MuST-C layout -> fairseq speech data
  (``scripts/prep_mustc.py``);
- :mod:`~leapformer_fairseq.recipes.tts`: a parallel corpus spoken by espeak-ng, in the MuST-C
  layout (``scripts/make_tts_corpus.py``).
"""
