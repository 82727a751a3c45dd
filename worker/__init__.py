"""chatqueue worker: everything that touches a model (torch, transformers, huggingface_hub).

Importing it sets OpenMP's wait policy for torch's CPU threads, before torch is loaded (libgomp
reads it once, when it loads): see `worker.openmp`.
"""

from worker import openmp

openmp.configure()
