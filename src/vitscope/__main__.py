from vitscope._console import main

main()
