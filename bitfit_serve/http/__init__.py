"""The HTTP faces of the server, one module a concern: ``services`` (what routes share),
``schemas`` (request and response bodies), ``auth`` (bearer tokens), ``edge`` (middleware and
error bodies), and one router per route group: the native ``inference``, ``admin`` and ``ops``,
and the faces of other servers' protocols, ``tei`` (text-embeddings-inference), ``hf_inference``
(HF Inference API), ``openai_compat`` (vLLM / OpenAI classify) and ``kserve`` (Open Inference
Protocol v2). ``bitfit_serve.server.create_app`` assembles them (``server.FACES``)."""
