"""unlearn: remove a forget set by editing only the parameters tied to it.

Scope masks chosen by attribution, unlearning objectives and a masked update loop that
leaves every out-of-scope parameter bit-identical (arrives with the unlearning issue).
"""

__all__: list[str] = []
