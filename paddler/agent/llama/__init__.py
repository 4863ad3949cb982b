"""The llama.cpp engine, one concept per module.

- ``native``: the only import of ``llama_cpp``; native handles (model, context,
  batch, sampler chain) as small context managers with an explicit ``close()``;
- ``sampling``: a request's sampler chain and grammar;
- ``prompt``: a request's prompt as tokens (chat template rendering);
- ``slot``: one sequence id of the context and the request it serves;
- ``embedder``: pooled embeddings on a second context;
- ``loading``: a desired state turned into a loaded model (resolve, load, report);
- ``swap``: the engine's model: desired states drained and swapped, downloads;
- ``admission``: the free slot a request takes and the KV cells it keeps;
- ``batching``: a step's batch, assembled in slot order and rolled back;
- ``output``: a slot's text split by kind, paced, counted and sent;
- ``scheduler``: ``LlamaEngine``, the continuous-batching loop over the slots.

``paddler.agent.llama_engine`` re-exports the names other packages import.
"""
