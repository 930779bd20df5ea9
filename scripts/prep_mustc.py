"""MuST-C (or make_tts_corpus.py output) -> fairseq speech_to_text data for ASR and ST
(leapformer_fairseq.recipes.mustc; docs/recipes.md).

    python scripts/prep_mustc.py --data-root MUSTC_ROOT --lang de --out work/mustc-en-de
"""
from leapformer_fairseq.recipes.mustc import main

if __name__ == "__main__":
    main()
