"""The realism quiz in the browser: the blinded Quiz tab and the admin Results tab (:mod:`app.quiz.tabs`), their
callbacks (:mod:`app.quiz.callbacks`) and the results figures (:mod:`app.quiz.results`). Studies, reader sessions
and the store are :mod:`echolvfm_core.quiz`.
"""
