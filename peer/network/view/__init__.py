"""Who a peer knows: the membership view, its announce/expire loop, the bounded partial view
and the lookup of peers it has not heard from."""
