"""EchoLVFM Studio, the Gradio app: ``python launch.py`` starts it.

Modules: :mod:`app.engine` (models and requests, no Gradio), :mod:`app.ui` (layout), :mod:`app.callbacks` (event
handlers), :mod:`app.server` (launch settings), :mod:`app.cases` (--data folders), :mod:`app.video` and
:mod:`app.figures` (what is shown), :mod:`app.bench` (latency through the API), :mod:`app.quiz` (realism study).
Nothing here loads a model or imports Gradio at import time.
"""
