"""Operations across the three services: the consistency audit, the saga dashboard, `check_consistency`.

No service imports this app; it reads orders, inventory and reports only
through their `public` modules, and writes nothing.
"""
