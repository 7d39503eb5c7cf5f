"""Multi-task LoRA fine-tuning of Swin backbones with DeepSpeed (see README.md).

Importing the package sets OpenMP's passive wait policy where the environment does not choose one
(:func:`mtlora_dist.cpus.set_openmp_defaults`): the entry points import it before torch, whose OpenMP
runtime reads the policy once, when it loads.
"""

from mtlora_dist.cpus import set_openmp_defaults

set_openmp_defaults()
