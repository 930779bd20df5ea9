"""Synthesise the source side of a parallel corpus with espeak-ng, in the MuST-C layout
(leapformer_fairseq.recipes.tts; docs/recipes.md).

    python scripts/make_tts_corpus.py --corpus data/gettext-mt/en-de.{split}.tsv --src en \
        --tgt de --out work/tts-mustc --max-train 2000 --max-valid 100 --max-test 100
"""
from leapformer_fairseq.recipes.tts import main

if __name__ == "__main__":
    main()
