"""Study runner: a grid of text-to-text wait-k runs from one study file, evaluated with
SimulEval, in one table (leapformer_fairseq.recipes.study; docs/quality.md).

    python scripts/study.py run studies/t2t_screen_en_de --jobs 2
    python scripts/study.py evaluate studies/t2t_screen_en_de --rows leap --sentences 100
    python scripts/study.py table studies/t2t_screen_en_de
"""
from leapformer_fairseq.recipes.study import main

if __name__ == "__main__":
    main()
