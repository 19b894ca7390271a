"""One module per ``excise`` subcommand: read the user's files, call the libraries, write.

:mod:`~excise.commands.attribute`, :mod:`~excise.commands.unlearn`,
:mod:`~excise.commands.audit`, :mod:`~excise.commands.forget` and
:mod:`~excise.commands.ledger`; the parser and the printing live in :mod:`excise.cli`.
"""
