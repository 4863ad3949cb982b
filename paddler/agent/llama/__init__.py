"""The llama.cpp engine, one concept per module.

- ``native``: the only import of ``llama_cpp``; native handles (model, context,
  batch, sampler chain) as small context managers with an explicit ``close()``;
- ``sampling``: a request's sampler chain and grammar;
- ``prompt``: a request's prompt as tokens (chat template rendering);
- ``slot``: one sequence id of the context and the request it serves;
- ``embedder``: pooled embeddings on a second context;
- ``loading``: a desired state turned into a loaded model (resolve, load, report);
- ``scheduler``: ``LlamaEngine``, the continuous-batching loop over the slots.

``paddler.agent.llama_engine`` re-exports the names other packages import.
"""
