from setuptools import find_packages, setup

setup(
    name="leapformer_fairseq",
    version="0.1.0",
    description="LeaPformer linear attention for simultaneous translation, as a fairseq plugin",
    packages=find_packages(include=["leapformer_fairseq", "leapformer_fairseq.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "fairseq-fixed==0.12.3.1",
        "simuleval==1.1.4",
        "sentencepiece",
        "sacrebleu",
        "soundfile",
        "ninja",  # builds the fused CPU decode step (leapformer_fairseq/ops/linear_attention)
    ],
    package_data={"leapformer_fairseq.ops.linear_attention": ["fused_step.cpp"]},
    # the GPU backend of the causal sums (LEAPFORMER_ATTENTION_BACKEND=fla; docs/models.md)
    extras_require={"gpu": ["fla-core==0.6.0"]},
)
